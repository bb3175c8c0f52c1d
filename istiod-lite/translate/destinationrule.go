package translate

import (
	"fmt"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	networking "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"

	"github.com/ambit-mesh/ambit/model"
)

// KindDestinationRule is the kind of DestinationRule objects.
const KindDestinationRule = "DestinationRule"

// ReasonConflict: another object already configures the same thing.
const ReasonConflict = "Conflict"

// destinationRule translates a DestinationRule's trafficPolicy subset for
// waypoints: connectionPool, outlierDetection, loadBalancer.simple and
// portLevelSettings. Other fields are reported as unsupported and ignored
// (none of them widens access: a waypoint always reaches endpoints over
// HBONE with its own identity, whatever tls says). A host that is not a
// Service name (a wildcard, an external name) makes the rule inert: nil.
func (t *translator) destinationRule(dr *networkingv1.DestinationRule) *model.DestinationRule {
	spec := &dr.Spec
	report := func(reason, format string, args ...any) {
		t.report(KindDestinationRule, dr.Namespace, dr.Name, reason, format, args...)
	}
	host := spec.GetHost()
	svc, ok := t.serviceForHost(dr.Namespace, host)
	if !ok {
		report(ReasonUnsupported, "host %q is not a Service host name (<name>, <name>.<namespace> or <name>.<namespace>.svc.%s); ignored", host, t.opts.DomainSuffix)
		return nil
	}
	if spec.GetWorkloadSelector() != nil {
		report(ReasonUnsupported, "workloadSelector applies to sidecars; ignored")
		return nil
	}
	if len(spec.GetSubsets()) > 0 {
		report(ReasonUnsupported, "subsets are not supported (no VirtualService); ignored")
	}
	if first := t.firstDestinationRule(svc); first != "" && first < Key(dr.Namespace, dr.Name) {
		report(ReasonConflict, "DestinationRule %s already applies to %s; this one is ignored (rules for one host are not merged)", first, host)
	}
	out := &model.DestinationRule{Name: dr.Name, Namespace: dr.Namespace, Service: svc}
	tp := spec.GetTrafficPolicy()
	if tp == nil {
		return out
	}
	if tp.GetTls() != nil {
		report(ReasonUnsupported, "trafficPolicy.tls is not supported (waypoints reach endpoints over HBONE); ignored")
	}
	if tp.GetTunnel() != nil || tp.GetProxyProtocol() != nil || tp.GetRetryBudget() != nil {
		report(ReasonUnsupported, "trafficPolicy.tunnel, proxyProtocol and retryBudget are not supported; ignored")
	}
	out.Policy = t.trafficPolicy(report, "trafficPolicy", tp.GetLoadBalancer(), tp.GetConnectionPool(), tp.GetOutlierDetection())
	for i, pl := range tp.GetPortLevelSettings() {
		n := pl.GetPort().GetNumber()
		if n == 0 || n > 65535 {
			report(ReasonInvalidPolicy, "trafficPolicy.portLevelSettings[%d]: port %d is not a port; ignored", i, n)
			continue
		}
		if pl.GetTls() != nil {
			report(ReasonUnsupported, "trafficPolicy.portLevelSettings[%d].tls is not supported; ignored", i)
		}
		lb, cp, od := pl.GetLoadBalancer(), pl.GetConnectionPool(), pl.GetOutlierDetection()
		// A section set at port level replaces the top-level one (Istio).
		if lb == nil {
			lb = tp.GetLoadBalancer()
		}
		if cp == nil {
			cp = tp.GetConnectionPool()
		}
		if od == nil {
			od = tp.GetOutlierDetection()
		}
		where := fmt.Sprintf("trafficPolicy.portLevelSettings[%d]", i)
		out.Ports = append(out.Ports, model.PortTrafficPolicy{Port: uint16(n), Policy: t.trafficPolicy(report, where, lb, cp, od)})
	}
	return out
}

func (t *translator) trafficPolicy(report func(reason, format string, args ...any), where string, lb *networking.LoadBalancerSettings, cp *networking.ConnectionPoolSettings, od *networking.OutlierDetection) model.TrafficPolicy {
	var out model.TrafficPolicy
	if lb != nil {
		switch lb.GetSimple() {
		case networking.LoadBalancerSettings_UNSPECIFIED, networking.LoadBalancerSettings_ROUND_ROBIN:
			if lb.GetSimple() == networking.LoadBalancerSettings_ROUND_ROBIN {
				out.LoadBalancer = model.LBRoundRobin
			}
		case networking.LoadBalancerSettings_LEAST_REQUEST:
			out.LoadBalancer = model.LBLeastRequest
		case networking.LoadBalancerSettings_LEAST_CONN: //lint:ignore SA1019 the deprecated alias of LEAST_REQUEST is still written
			out.LoadBalancer = model.LBLeastRequest
		case networking.LoadBalancerSettings_RANDOM:
			out.LoadBalancer = model.LBRandom
		default:
			report(ReasonUnsupported, "%s.loadBalancer.simple %s is not supported; ROUND_ROBIN applies", where, lb.GetSimple())
		}
		if lb.GetConsistentHash() != nil || lb.GetLocalityLbSetting() != nil || lb.GetWarmup() != nil || lb.GetWarmupDurationSecs() != nil {
			report(ReasonUnsupported, "%s.loadBalancer: only simple is supported; the rest is ignored", where)
		}
	}
	if cp != nil {
		p := &model.ConnectionPool{}
		if tcp := cp.GetTcp(); tcp != nil {
			p.MaxConnections = tcp.GetMaxConnections()
			p.ConnectTimeout = t.duration(report, where+".connectionPool.tcp.connectTimeout", tcp.GetConnectTimeout())
			if tcp.GetTcpKeepalive() != nil || tcp.GetMaxConnectionDuration() != nil || tcp.GetIdleTimeout() != nil {
				report(ReasonUnsupported, "%s.connectionPool.tcp: tcpKeepalive, maxConnectionDuration and idleTimeout are not supported; ignored", where)
			}
		}
		if h := cp.GetHttp(); h != nil {
			p.MaxPendingRequests = h.GetHttp1MaxPendingRequests()
			p.MaxRequests = h.GetHttp2MaxRequests()
			p.MaxRequestsPerConnection = h.GetMaxRequestsPerConnection()
			p.MaxRetries = h.GetMaxRetries()
			p.IdleTimeout = t.duration(report, where+".connectionPool.http.idleTimeout", h.GetIdleTimeout())
			if h.GetH2UpgradePolicy() != networking.ConnectionPoolSettings_HTTPSettings_DEFAULT || h.GetUseClientProtocol() || h.GetMaxConcurrentStreams() != 0 || h.GetHttp2KeepAlive() != nil {
				report(ReasonUnsupported, "%s.connectionPool.http: h2UpgradePolicy, useClientProtocol, maxConcurrentStreams and http2KeepAlive are not supported; ignored", where)
			}
		}
		for _, v := range []int32{p.MaxConnections, p.MaxPendingRequests, p.MaxRequests, p.MaxRequestsPerConnection, p.MaxRetries} {
			if v < 0 {
				report(ReasonInvalidPolicy, "%s.connectionPool: negative limit %d; treated as unset", where, v)
			}
		}
		p.MaxConnections, p.MaxPendingRequests, p.MaxRequests = max(p.MaxConnections, 0), max(p.MaxPendingRequests, 0), max(p.MaxRequests, 0)
		p.MaxRequestsPerConnection, p.MaxRetries = max(p.MaxRequestsPerConnection, 0), max(p.MaxRetries, 0)
		out.ConnectionPool = p
	}
	if od != nil {
		o := &model.OutlierDetection{
			Interval:           t.duration(report, where+".outlierDetection.interval", od.GetInterval()),
			BaseEjectionTime:   t.duration(report, where+".outlierDetection.baseEjectionTime", od.GetBaseEjectionTime()),
			MaxEjectionPercent: od.GetMaxEjectionPercent(),
		}
		if v := od.GetConsecutive_5XxErrors(); v != nil {
			n := v.GetValue()
			o.Consecutive5xx = &n
		}
		//lint:ignore SA1019 the deprecated field is reported, not used
		if od.GetConsecutiveErrors() != 0 {
			report(ReasonUnsupported, "%s.outlierDetection.consecutiveErrors is deprecated and not supported (use consecutive5xxErrors or consecutiveGatewayErrors); ignored", where)
		}
		if v := od.GetConsecutiveGatewayErrors(); v != nil {
			n := v.GetValue()
			o.ConsecutiveGatewayErrors = &n
		}
		if o.MaxEjectionPercent < 0 || o.MaxEjectionPercent > 100 {
			report(ReasonInvalidPolicy, "%s.outlierDetection.maxEjectionPercent %d is not a percentage; 10 applies", where, o.MaxEjectionPercent)
			o.MaxEjectionPercent = 0
		}
		if od.GetSplitExternalLocalOriginErrors() || od.GetConsecutiveLocalOriginFailures() != nil || od.GetMinHealthPercent() != 0 {
			report(ReasonUnsupported, "%s.outlierDetection: splitExternalLocalOriginErrors, consecutiveLocalOriginFailures and minHealthPercent are not supported; ignored", where)
		}
		out.OutlierDetection = o
	}
	return out
}

func (t *translator) duration(report func(reason, format string, args ...any), where string, d *durationpb.Duration) time.Duration {
	if d == nil {
		return 0
	}
	if err := d.CheckValid(); err != nil || d.AsDuration() < 0 {
		report(ReasonInvalidPolicy, "%s is not a valid duration; ignored", where)
		return 0
	}
	return d.AsDuration()
}

// firstDestinationRule returns the key of the first DestinationRule (by
// key) for a service: the one waypoints apply (istiod-lite/envoy).
func (t *translator) firstDestinationRule(svc string) string {
	first := ""
	for k, dr := range t.o.DestinationRules {
		if first != "" && k >= first {
			continue
		}
		if dr.Spec.GetWorkloadSelector() != nil {
			continue
		}
		if s, ok := t.serviceForHost(dr.Namespace, dr.Spec.GetHost()); ok && s == svc {
			first = k
		}
	}
	return first
}

// serviceForHost resolves a DestinationRule host, as Istio does for
// Kubernetes services: a short name is in the rule's namespace.
func (t *translator) serviceForHost(ns, host string) (string, bool) {
	suffix := ".svc." + t.opts.DomainSuffix
	if host == "" || strings.Contains(host, "*") {
		return "", false
	}
	parts := strings.Split(strings.TrimSuffix(host, suffix), ".")
	switch {
	case len(parts) == 1:
		return ns + "/" + parts[0] + "." + ns + suffix, true
	case len(parts) == 2:
		return parts[1] + "/" + parts[0] + "." + parts[1] + suffix, true
	}
	return "", false
}
