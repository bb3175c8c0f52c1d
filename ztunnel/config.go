package ztunnel

import (
	"context"
	"log/slog"
	"net/netip"
	"time"

	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/relay"
)

// Config configures a Proxy. Store is required; every other field is
// optional. A listener whose address is empty is not opened, so a test can
// run only the parts it needs (and several proxies in one process on
// ephemeral loopback ports: "127.0.0.1:0").
type Config struct {
	// Store holds the config model (fed by the xDS client or a config file).
	// Required.
	Store *model.Store
	// Certs supplies local workloads' SVIDs and the trust bundles; without
	// it the proxy cannot tunnel, and the HBONE listener is not served.
	// When it has a SetIdentities([]spiffeid.ID) method (certs.Manager), the
	// proxy calls it with the identities of the node's workloads whenever the
	// config changes.
	Certs hbone.CertSource
	// Node is this node's name: workloads whose Node differs are not local
	// (their traffic is not accepted on the capture listeners, they get no
	// certificate). Empty means every workload is local (single-node and
	// local mode).
	Node string

	// Listener addresses ("host:port"); empty disables the listener.
	OutboundAddr string // 15001, transparent capture of outbound
	InboundAddr  string // 15006, transparent capture of plaintext inbound
	HBONEAddr    string // 15008
	SOCKS5Addr   string // 15080
	AdminAddr    string // 15000; must be a loopback address
	MetricsAddr  string // 15020
	ReadyAddr    string // 15021

	// Transparent sets IP_TRANSPARENT on the capture listeners (so they
	// accept connections to any address, the original destination being the
	// accepted socket's local address) and makes delivery to a local pod bind
	// to the client's address, so the application sees its real peer. It
	// needs CAP_NET_ADMIN; without it the pod sees the proxy's address.
	Transparent bool
	// Mark, when non-zero, is set (SO_MARK) on every socket the proxy dials
	// and, when Transparent, on its capture listeners (their accepted
	// connections inherit it), so that capture can tell the proxy's own
	// packets from other host processes': the eBPF capture lets only
	// packets with its bypass mark (bpf.Options.BypassMark), and kubelet's
	// probes, reach an enrolled pod from the node directly.
	Mark uint32

	// QUIC enables HBONE over HTTP/3 (package hbone/h3): the proxy also
	// serves it on the HBONE listener's address over UDP, and tunnels over
	// it to destinations that advertise it (model.Workload.QUIC), falling
	// back to HTTP/2 when a QUIC dial fails (quic.go). Off by default.
	QUIC bool
	// QUICDialTimeout bounds a QUIC dial before the fallback to HTTP/2
	// (DefaultQUICDialTimeout if zero).
	QUICDialTimeout time.Duration
	// QUICRetryAfter is how long an address whose QUIC dial failed is
	// reached over HTTP/2 only (DefaultQUICRetryAfter if zero).
	QUICRetryAfter time.Duration

	// HBONEDialAddr maps the HBONE address a route asks for (<pod IP>:15008
	// or a waypoint's) to the address actually dialled. Nil dials it as is,
	// which is right wherever eBPF steers <pod IP>:15008 to the node's proxy.
	// It is a test seam: proxies sharing a loopback interface listen on
	// distinct ephemeral ports and map each pod IP to its node's proxy.
	HBONEDialAddr func(netip.AddrPort) netip.AddrPort

	// Capture, when set, receives the node's enrolled workloads whenever the
	// config changes (the eBPF capture's reconciler). Nil runs without it.
	Capture Capture
	// Synced reports whether the config source has delivered a first
	// config; readiness waits for it. Nil: ready once the store has changed
	// after New or holds any workload.
	Synced func() bool

	// PodCIDRs are the address ranges of the mesh's pods (the cluster's pod
	// CIDRs; add the service CIDR to treat unknown service addresses alike).
	// An outbound destination inside them that the config does not know
	// (yet: a pod just started, a config update in flight) is never passed
	// through in clear: the connection waits up to UnknownDestinationWait
	// for the config to learn it, then is resolved as usual, or reset.
	// Empty: every unknown destination passes through (plain TCP).
	PodCIDRs []netip.Prefix
	// UnknownDestinationWait bounds that wait
	// (DefaultUnknownDestinationWait if zero; negative: reset at once).
	UnknownDestinationWait time.Duration

	// RootNamespace holds mesh-wide policies (authz.DefaultRootNamespace if
	// empty).
	RootNamespace string
	// ConnectTimeout bounds each upstream connect (10s if zero).
	ConnectTimeout time.Duration
	// DrainTimeout bounds how long Run lets connections finish after its
	// context ends (DefaultDrainTimeout if zero; negative: close at once).
	DrainTimeout time.Duration
	// IdleTimeout closes a proxied connection through which no byte moved
	// either way for this long (DefaultIdleTimeout if zero; negative:
	// never).
	IdleTimeout time.Duration
	// HalfCloseTimeout bounds how long a proxied connection stays
	// half-closed: after one side's FIN, the other has this long to end
	// too (DefaultHalfCloseTimeout if zero; negative: no bound).
	HalfCloseTimeout time.Duration
	// Logger receives structured logs and one access-log line per
	// connection (nil: discard).
	Logger *slog.Logger
}

// DefaultDrainTimeout is how long connections may finish after shutdown starts.
const DefaultDrainTimeout = 30 * time.Second

// Bounds on silent connections (relay.Joiner). The idle timeout is Envoy's
// TCP proxy default, which Istio's sidecars and waypoints keep: long-lived
// quiet connections (databases, message brokers) are expected to use TCP
// keep-alives or their own pings. The half-close bound reclaims
// connections whose client sent its FIN and whose upstream never answers.
const (
	DefaultIdleTimeout      = time.Hour
	DefaultHalfCloseTimeout = 5 * time.Minute
)

// DefaultUnknownDestinationWait is how long an outbound connection to an
// unknown destination inside Config.PodCIDRs waits for the config to learn
// it.
const DefaultUnknownDestinationWait = 5 * time.Second

// maxUnknownWaits bounds the connections waiting for an unknown destination
// at once (each holds a goroutine and two sockets); past it they are reset
// at once: a pod scanning the pod CIDRs cannot pile them up.
const maxUnknownWaits = 1024

// maxUnknownWaitsPerSource is each source address's share of
// maxUnknownWaits: one pod cannot take the node's slots from the others.
const maxUnknownWaitsPerSource = 64

// Capture steers the node's enrolled workloads' traffic to the proxy (the
// bpf package's loader implements it in the node agent).
type Capture interface {
	// Reconcile makes capture cover exactly pods (local, enrolled workloads).
	Reconcile(ctx context.Context, pods []*model.Workload) error
}

// CaptureStatus is implemented by a Capture that can say what it is doing:
// the admin API serves it on /debug/capture.
type CaptureStatus interface {
	Status() (any, error)
}

func (c *Config) connectTimeout() time.Duration {
	if c.ConnectTimeout > 0 {
		return c.ConnectTimeout
	}
	return 10 * time.Second
}

func (c *Config) drainTimeout() time.Duration {
	switch {
	case c.DrainTimeout == 0:
		return DefaultDrainTimeout
	case c.DrainTimeout < 0:
		return 0
	}
	return c.DrainTimeout
}

// joiner is the relay with the bounds on silent connections.
func (c *Config) joiner() relay.Joiner {
	return relay.Joiner{
		IdleTimeout:      positive(c.IdleTimeout, DefaultIdleTimeout),
		HalfCloseTimeout: positive(c.HalfCloseTimeout, DefaultHalfCloseTimeout),
	}
}

// positive returns d, def if d is zero, 0 (none) if d is negative.
func positive(d, def time.Duration) time.Duration {
	switch {
	case d == 0:
		return def
	case d < 0:
		return 0
	}
	return d
}

func (c *Config) hboneDialAddr(a netip.AddrPort) netip.AddrPort {
	if c.HBONEDialAddr != nil {
		return c.HBONEDialAddr(a)
	}
	return a
}

// inPodCIDRs reports whether a is inside one of PodCIDRs.
func (c *Config) inPodCIDRs(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range c.PodCIDRs {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// isLocal reports whether w runs on this node.
func (c *Config) isLocal(w *model.Workload) bool {
	return w != nil && (c.Node == "" || w.Node == "" || w.Node == c.Node)
}
