// Package analyzer finds misconfiguration in ambit's inputs, in the manner of
// istioctl analyze: each Finding has a code (AMB0001...), a severity, the
// object, a message and a fix. Analyze is pure: ambitctl feeds it objects
// read from files (with istiod-lite's decoder) or listed from a cluster.
package analyzer

import (
	"fmt"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/istiod-lite/security"
	"github.com/ambit-mesh/ambit/model"
)

// Severity of a finding; only errors make ambitctl analyze fail.
type Severity string

// Severities.
const (
	Error   Severity = "Error"
	Warning Severity = "Warning"
	Info    Severity = "Info"
)

// Codes of the findings.
const (
	CodeMissingWaypoint     = "AMB0001" // istio.io/use-waypoint names a Gateway that does not exist
	CodeBadWaypointListener = "AMB0002" // a waypoint Gateway without exactly the mesh HBONE listener on 15008
	CodeMissingParent       = "AMB0003" // an HTTPRoute's parent Service or Gateway does not exist
	CodeMissingBackend      = "AMB0004" // an HTTPRoute's backend Service does not exist
	CodeZeroWeights         = "AMB0005" // an HTTPRoute rule whose backend weights sum to 0
	CodeSelectsNothing      = "AMB0006" // an AuthorizationPolicy whose selector matches no workload
	CodeStrictNotEnrolled   = "AMB0007" // a STRICT PeerAuthentication in a namespace that is not enrolled
	CodeWaypointNotReady    = "AMB0008" // istio.io/use-waypoint names a waypoint that reports Programmed=False
	CodeNotAWaypoint        = "AMB0009" // istio.io/use-waypoint names a Gateway of another class
)

// Finding is one problem.
type Finding struct {
	Code     string   `json:"code"`
	Severity Severity `json:"severity"`
	Object   string   `json:"object"` // "HTTPRoute demo/reviews", "Namespace demo"
	Message  string   `json:"message"`
	Fix      string   `json:"fix"`
}

func (f Finding) String() string {
	return fmt.Sprintf("%s [%s] (%s) %s Fix: %s", f.Severity, f.Code, f.Object, f.Message, f.Fix)
}

// Workload is a pod, or the pod template of a controller, for selectors.
type Workload struct {
	Kind      string // Pod, Deployment...
	Namespace string
	Name      string
	Labels    map[string]string
}

// Input is what Analyze looks at. Nil slices are empty.
type Input struct {
	Namespaces            []*corev1.Namespace
	Pods                  []*corev1.Pod
	Services              []*corev1.Service
	Gateways              []*gwv1.Gateway
	HTTPRoutes            []*gwv1.HTTPRoute
	AuthorizationPolicies []*security.AuthorizationPolicy
	PeerAuthentications   []*security.PeerAuthentication
	// Workloads are controllers' pod templates (pods are added from Pods).
	Workloads []Workload
}

// Add sorts typed objects (as translate.Decode returns them) into in;
// other types are ignored.
func (in *Input) Add(objs ...any) {
	for _, o := range objs {
		switch o := o.(type) {
		case *corev1.Namespace:
			in.Namespaces = append(in.Namespaces, o)
		case *corev1.Pod:
			in.Pods = append(in.Pods, o)
		case *corev1.Service:
			in.Services = append(in.Services, o)
		case *gwv1.Gateway:
			in.Gateways = append(in.Gateways, o)
		case *gwv1.HTTPRoute:
			in.HTTPRoutes = append(in.HTTPRoutes, o)
		case *security.AuthorizationPolicy:
			in.AuthorizationPolicies = append(in.AuthorizationPolicies, o)
		case *security.PeerAuthentication:
			in.PeerAuthentications = append(in.PeerAuthentications, o)
		case Workload:
			in.Workloads = append(in.Workloads, o)
		}
	}
}

// Analyze returns the findings, sorted by object then code.
func Analyze(in Input) []Finding {
	a := &analysis{in: in,
		namespaces: map[string]*corev1.Namespace{},
		services:   map[string]*corev1.Service{},
		gateways:   map[string]*gwv1.Gateway{},
	}
	for _, ns := range in.Namespaces {
		a.namespaces[ns.Name] = ns
	}
	for _, s := range in.Services {
		a.services[s.Namespace+"/"+s.Name] = s
	}
	for _, g := range in.Gateways {
		a.gateways[g.Namespace+"/"+g.Name] = g
	}
	a.useWaypoint()
	a.waypointListeners()
	a.routes()
	a.authorizationPolicies()
	a.peerAuthentications()
	sort.SliceStable(a.findings, func(i, j int) bool {
		fi, fj := a.findings[i], a.findings[j]
		if fi.Object != fj.Object {
			return fi.Object < fj.Object
		}
		return fi.Code < fj.Code
	})
	return a.findings
}

type analysis struct {
	in         Input
	namespaces map[string]*corev1.Namespace
	services   map[string]*corev1.Service // "ns/name"
	gateways   map[string]*gwv1.Gateway   // "ns/name"
	findings   []Finding
}

func (a *analysis) add(code string, sev Severity, object, fix, format string, args ...any) {
	a.findings = append(a.findings, Finding{Code: code, Severity: sev, Object: object, Message: fmt.Sprintf(format, args...), Fix: fix})
}

func objectName(kind, ns, name string) string {
	if ns == "" {
		return kind + " " + name
	}
	return kind + " " + ns + "/" + name
}

// useWaypoint checks istio.io/use-waypoint on namespaces, services and pods.
func (a *analysis) useWaypoint() {
	check := func(object, ns string, l map[string]string) {
		wp := l[model.LabelUseWaypoint]
		if wp == "" || wp == "none" {
			return
		}
		wpNS := ns
		if v := l["istio.io/use-waypoint-namespace"]; v != "" {
			wpNS = v
		}
		g, ok := a.gateways[wpNS+"/"+wp]
		switch {
		case !ok:
			a.add(CodeMissingWaypoint, Error, object,
				fmt.Sprintf("create it (ambitctl waypoint apply -n %s --name %s) or correct the label", wpNS, wp),
				"%s=%s names waypoint %s/%s, which does not exist: its traffic fails closed.", model.LabelUseWaypoint, wp, wpNS, wp)
		case string(g.Spec.GatewayClassName) != "istio-waypoint":
			a.add(CodeNotAWaypoint, Error, object,
				fmt.Sprintf("name a Gateway of class istio-waypoint (ambitctl waypoint apply -n %s --name <name>)", wpNS),
				"%s=%s names Gateway %s/%s of class %q, which is not a waypoint.", model.LabelUseWaypoint, wp, wpNS, wp, g.Spec.GatewayClassName)
		default:
			for _, c := range g.Status.Conditions {
				if c.Type == string(gwv1.GatewayConditionProgrammed) && c.Status == "False" {
					a.add(CodeWaypointNotReady, Warning, object,
						fmt.Sprintf("see why: ambitctl waypoint status -n %s %s", wpNS, wp),
						"%s=%s names waypoint %s/%s, which is not programmed (%s: %s): its traffic fails closed until it is.", model.LabelUseWaypoint, wp, wpNS, wp, c.Reason, c.Message)
				}
			}
		}
	}
	for _, ns := range a.in.Namespaces {
		check(objectName("Namespace", "", ns.Name), ns.Name, ns.Labels)
	}
	for _, s := range a.in.Services {
		check(objectName("Service", s.Namespace, s.Name), s.Namespace, s.Labels)
	}
	for _, p := range a.in.Pods {
		check(objectName("Pod", p.Namespace, p.Name), p.Namespace, p.Labels)
	}
}

// waypointListeners checks that every waypoint has exactly the mesh
// listener: port 15008, protocol HBONE.
func (a *analysis) waypointListeners() {
	for _, g := range a.in.Gateways {
		if g.Spec.GatewayClassName != "istio-waypoint" {
			continue
		}
		object := objectName("Gateway", g.Namespace, g.Name)
		fix := "give it one listener {name: mesh, port: 15008, protocol: HBONE} (ambitctl waypoint generate prints one)"
		for _, l := range g.Spec.Listeners {
			switch {
			case l.Protocol != "HBONE":
				a.add(CodeBadWaypointListener, Error, object, fix,
					"listener %s (port %d, protocol %s) is not supported by waypoints, which accept only HBONE.", l.Name, l.Port, l.Protocol)
			case l.Port != model.PortHBONE:
				a.add(CodeBadWaypointListener, Error, object, fix,
					"HBONE listener %s is on port %d; ztunnels send to waypoints on %d.", l.Name, l.Port, model.PortHBONE)
			}
		}
		if len(g.Spec.Listeners) == 0 {
			a.add(CodeBadWaypointListener, Error, object, fix, "it has no listener: ztunnels send to waypoints on HBONE port %d.", model.PortHBONE)
		}
	}
}

// routes checks HTTPRoutes' parents, backends and weights.
func (a *analysis) routes() {
	for _, r := range a.in.HTTPRoutes {
		object := objectName("HTTPRoute", r.Namespace, r.Name)
		for _, p := range r.Spec.ParentRefs {
			ns := r.Namespace
			if p.Namespace != nil && *p.Namespace != "" {
				ns = string(*p.Namespace)
			}
			group, kind := "gateway.networking.k8s.io", "Gateway"
			if p.Group != nil {
				group = string(*p.Group)
			}
			if p.Kind != nil {
				kind = string(*p.Kind)
			}
			switch {
			case (group == "" || group == "core") && kind == "Service":
				if _, ok := a.services[ns+"/"+string(p.Name)]; !ok {
					a.add(CodeMissingParent, Error, object,
						"create the Service or correct parentRefs",
						"parent Service %s/%s does not exist: the route applies to nothing.", ns, p.Name)
				}
			case group == "gateway.networking.k8s.io" && kind == "Gateway":
				if _, ok := a.gateways[ns+"/"+string(p.Name)]; !ok {
					a.add(CodeMissingParent, Error, object,
						"create the Gateway or correct parentRefs",
						"parent Gateway %s/%s does not exist: the route applies to nothing.", ns, p.Name)
				}
			}
		}
		for i, rule := range r.Spec.Rules {
			if len(rule.BackendRefs) == 0 {
				continue
			}
			sum := int32(0)
			for _, b := range rule.BackendRefs {
				w := int32(1)
				if b.Weight != nil {
					w = *b.Weight
				}
				sum += w
				group, kind := "", "Service"
				if b.Group != nil {
					group = string(*b.Group)
				}
				if b.Kind != nil {
					kind = string(*b.Kind)
				}
				if (group != "" && group != "core") || kind != "Service" {
					continue
				}
				ns := r.Namespace
				if b.Namespace != nil && *b.Namespace != "" {
					ns = string(*b.Namespace)
				}
				if _, ok := a.services[ns+"/"+string(b.Name)]; !ok {
					a.add(CodeMissingBackend, Error, object,
						"create the Service or correct backendRefs",
						"rule %d: backend Service %s/%s does not exist: its share of requests gets 500.", i, ns, b.Name)
				}
			}
			if sum == 0 {
				a.add(CodeZeroWeights, Error, object,
					"give at least one backendRef a positive weight",
					"rule %d: backend weights sum to 0: every request it matches gets 500.", i)
			}
		}
	}
}

// authorizationPolicies checks that selectors select something.
func (a *analysis) authorizationPolicies() {
	workloads := append([]Workload(nil), a.in.Workloads...)
	for _, p := range a.in.Pods {
		workloads = append(workloads, Workload{Kind: "Pod", Namespace: p.Namespace, Name: p.Name, Labels: p.Labels})
	}
	for _, ap := range a.in.AuthorizationPolicies {
		if ap.Spec.Selector == nil || len(ap.Spec.Selector.MatchLabels) == 0 {
			continue
		}
		sel := labels.SelectorFromSet(ap.Spec.Selector.MatchLabels)
		found := false
		for _, w := range workloads {
			if w.Namespace == ap.Namespace && sel.Matches(labels.Set(w.Labels)) {
				found = true
				break
			}
		}
		if !found {
			a.add(CodeSelectsNothing, Warning, objectName("AuthorizationPolicy", ap.Namespace, ap.Name),
				"correct spec.selector.matchLabels, or delete the policy",
				"selector %s matches no pod or workload in namespace %s: the policy applies to nothing.", formatLabels(ap.Spec.Selector.MatchLabels), ap.Namespace)
		}
	}
}

// peerAuthentications checks that STRICT applies where ztunnels capture.
func (a *analysis) peerAuthentications() {
	for _, pa := range a.in.PeerAuthentications {
		if pa.Spec.MTLS == nil || pa.Spec.MTLS.Mode != "STRICT" {
			continue
		}
		ns, ok := a.namespaces[pa.Namespace]
		if !ok || ns.Labels[model.LabelDataplaneMode] == model.DataplaneAmbient {
			continue
		}
		a.add(CodeStrictNotEnrolled, Warning, objectName("PeerAuthentication", pa.Namespace, pa.Name),
			fmt.Sprintf("enroll the namespace (ambitctl enroll %s) or delete the policy", pa.Namespace),
			"mode STRICT in namespace %s, which is not enrolled (%s=%s): no ztunnel enforces it.", pa.Namespace, model.LabelDataplaneMode, model.DataplaneAmbient)
	}
}

func formatLabels(m map[string]string) string {
	var kv []string
	for k, v := range m {
		kv = append(kv, k+"="+v)
	}
	sort.Strings(kv)
	return strings.Join(kv, ",")
}
