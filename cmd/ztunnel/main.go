// Command ztunnel is ambit's per-node L4 proxy: it captures enrolled workloads'
// TCP connections and carries them in mutual-TLS HBONE tunnels.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"

	"github.com/ambit-mesh/ambit/authz"
	"github.com/ambit-mesh/ambit/bpf"
	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/certs/spire"
	"github.com/ambit-mesh/ambit/credential"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/xdsclient"
	"github.com/ambit-mesh/ambit/ztunnel"
	"github.com/ambit-mesh/ambit/ztunnel/configfile"
)

// options are the command line.
type options struct {
	node           string
	configFile     string
	xdsAddr        string
	caDir          string
	identity       string // ca or spire
	spireAdmin     string // the SPIRE agent's admin socket (--identity=spire)
	caAddr         string
	caRoots        string
	tokenFile      string
	trustDomain    string
	rootNamespace  string
	proxy          ztunnel.Config // listener addresses, transparency, mark, drain
	capture        bool
	bpfPinPath     string
	uplinks        string
	probeCgroups   string
	allowNodeAFXDP bool
	logLevel       slog.Level
	logJSON        bool
}

func main() {
	fs := flag.NewFlagSet("ztunnel", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `ztunnel: ambit's per-node L4 proxy.

It listens on 15001 (outbound capture), 15006 (inbound plaintext capture),
15008 (HBONE), 15080 (SOCKS5), 15000 (admin, localhost), 15020 (metrics) and
15021 (readiness), holds one SPIFFE certificate per local workload and carries
enrolled workloads' TCP in mutual-TLS HTTP/2 CONNECT tunnels.

Config: --xds-address streams it from istiod-lite (Delta xDS over TLS checked
against --ca-roots, authenticated with --token-file; the last good config keeps
serving while it is away), or
--config names a JSON or YAML file of the model (workloads, services, policies,
peerAuthentications), reloaded when it changes.
Certificates: istiod-lite's certificate service (--ca-address, by default the
--xds-address, with --ca-roots and --token-file), or --ca-dir, a directory
holding the mesh's CA (generated on first start) for an in-process CA.
With --identity=spire they come from the node's SPIRE agent instead
(Delegated Identity API on --spire-admin-socket; docs/spire.md).
Capture: --capture loads the eBPF capture into the node's network namespace.

Usage: ztunnel [flags]

`)
		fs.PrintDefaults()
	}
	var o options
	host, _ := os.Hostname()
	fs.StringVar(&o.node, "node", envOr("NODE_NAME", host), "this node's name: workloads on other nodes are not served here ($NODE_NAME)")
	fs.StringVar(&o.configFile, "config", "", "local mode: the model as a JSON or YAML file, reloaded on change")
	fs.StringVar(&o.xdsAddr, "xds-address", "", "istiod-lite's address (host:15012): Delta xDS, and certificates unless --ca-address or --ca-dir says otherwise; needs --ca-roots and --token-file")
	fs.StringVar(&o.caDir, "ca-dir", "", "in-process CA: directory of the mesh CA (ca.crt, ca.key, roots.pem); created if missing")
	fs.StringVar(&o.caAddr, "ca-address", "", "istiod-lite's certificate service (host:15012); needs --ca-roots and --token-file")
	fs.StringVar(&o.caRoots, "ca-roots", "", "PEM roots that istiod-lite's serving certificate chains to (the ambit-ca-root ConfigMap)")
	fs.StringVar(&o.tokenFile, "token-file", "", "bearer token for istiod-lite's xDS and certificate service (a projected service-account token with audience istio-ca, or the host's secret in local mode), re-read per call")
	fs.StringVar(&o.trustDomain, "trust-domain", identity.DefaultTrustDomain.Name(), "SPIFFE trust domain")
	fs.StringVar(&o.rootNamespace, "root-namespace", authz.DefaultRootNamespace, "namespace whose policies apply mesh-wide")
	fs.StringVar(&o.proxy.OutboundAddr, "outbound-addr", fmt.Sprintf(":%d", model.PortOutbound), "outbound capture listener (empty: off)")
	fs.StringVar(&o.proxy.InboundAddr, "inbound-addr", fmt.Sprintf(":%d", model.PortInbound), "inbound plaintext capture listener (empty: off)")
	fs.StringVar(&o.proxy.HBONEAddr, "hbone-addr", fmt.Sprintf(":%d", model.PortHBONE), "HBONE listener (empty: off)")
	fs.BoolVar(&o.proxy.QUIC, "hbone-quic", os.Getenv("AMBIT_HBONE_QUIC") == "true", "HBONE over HTTP/3 (QUIC): also serve it on UDP at --hbone-addr, and tunnel over it to destinations that advertise it (label ambit.dev/hbone-quic=enabled), falling back to HTTP/2 when a QUIC dial fails ($AMBIT_HBONE_QUIC=true)")
	fs.DurationVar(&o.proxy.QUICRetryAfter, "hbone-quic-retry-after", ztunnel.DefaultQUICRetryAfter, "how long a destination whose QUIC dial failed is reached over HTTP/2 only")
	fs.StringVar(&o.proxy.SOCKS5Addr, "socks5-addr", fmt.Sprintf("127.0.0.1:%d", model.PortSOCKS5), "SOCKS5 listener for hosts without eBPF (empty: off)")
	fs.StringVar(&o.proxy.AdminAddr, "admin-addr", fmt.Sprintf("127.0.0.1:%d", model.PortAdmin), "admin listener; keep it on localhost (empty: off)")
	fs.StringVar(&o.proxy.MetricsAddr, "metrics-addr", fmt.Sprintf(":%d", model.PortMetrics), "Prometheus metrics listener (empty: off)")
	fs.StringVar(&o.proxy.ReadyAddr, "ready-addr", fmt.Sprintf(":%d", model.PortReady), "readiness listener, /healthz/ready (empty: off)")
	fs.BoolVar(&o.proxy.Transparent, "transparent", true, "IP_TRANSPARENT capture and delivery from the client's own address (needs CAP_NET_ADMIN)")
	fs.BoolVar(&o.capture, "capture", false, "load the eBPF capture in this (the node's) network namespace and keep it in step with the node's enrolled workloads")
	fs.StringVar(&o.bpfPinPath, "bpf-pin-path", "/sys/fs/bpf/ambit", "bpffs directory of the capture's pinned programs and maps")
	fs.StringVar(&o.uplinks, "uplinks", "", "comma-separated interfaces where other nodes' traffic arrives (empty: the default route's)")
	fs.BoolVar(&o.allowNodeAFXDP, "allow-node-af-xdp", false, "leave AF_XDP usable in the node's network namespace (by default capture's guard refuses its socket options there: like PACKET_QDISC_BYPASS, always refused, it sends frames on a pod's veth past capture)")
	fs.StringVar(&o.probeCgroups, "probe-cgroups", "/sys/fs/cgroup/system.slice/kubelet.service", "comma-separated cgroup v2 directories (kubelet's) whose TCP reaches enrolled pods from the node directly, for health probes; every other host process gets inbound capture (15006: PeerAuthentication STRICT resets it). Hybrid cgroup hosts: /sys/fs/cgroup/unified/...")
	mark := fs.Uint("mark", 0, "SO_MARK for the proxy's own connections (0: none)")
	fs.Func("pod-cidrs", "comma-separated pod CIDRs of the mesh (and the service CIDR, if wanted): an unknown destination inside them waits for the config (--unknown-destination-wait), then is reset, never passed through in clear", func(v string) error {
		for _, s := range strings.Split(v, ",") {
			p, err := netip.ParsePrefix(strings.TrimSpace(s))
			if err != nil {
				return err
			}
			o.proxy.PodCIDRs = append(o.proxy.PodCIDRs, p.Masked())
		}
		return nil
	})
	fs.DurationVar(&o.proxy.UnknownDestinationWait, "unknown-destination-wait", ztunnel.DefaultUnknownDestinationWait, "how long a connection to an unknown destination in --pod-cidrs waits for the config")
	fs.DurationVar(&o.proxy.DrainTimeout, "drain-timeout", ztunnel.DefaultDrainTimeout, "how long connections may finish after SIGTERM")
	fs.TextVar(&o.logLevel, "log-level", slog.LevelInfo, "debug, info, warn or error")
	fs.BoolVar(&o.logJSON, "log-json", true, "JSON logs (text when false)")
	fs.StringVar(&o.identity, "identity", "ca", "where workload certificates come from: ca (istiod-lite's certificate service, or --ca-dir) or spire (the node's SPIRE agent, Delegated Identity API on --spire-admin-socket)")
	fs.StringVar(&o.spireAdmin, "spire-admin-socket", "/run/spire/admin/admin.sock", "--identity=spire: the SPIRE agent's admin socket; this ztunnel must be one of its authorized_delegates")
	_ = fs.Parse(os.Args[1:])
	o.proxy.Mark = uint32(*mark)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "ztunnel:", err)
		os.Exit(1)
	}
}

// newIssuer returns what signs the node's workload certificates: the
// certificate service of istiod-lite, or an in-process CA.
func newIssuer(ctx context.Context, o options, td spiffeid.TrustDomain, token *credential.Bearer, log *slog.Logger) (certs.Issuer, func(), error) {
	switch {
	case o.caAddr != "" && o.caDir != "":
		return nil, nil, errors.New("give --ca-address or --ca-dir, not both")
	case o.caAddr != "":
		if o.caRoots == "" || o.tokenFile == "" {
			return nil, nil, errors.New("--ca-address needs --ca-roots and --token-file")
		}
		c := &caclient.Client{
			Addr:        o.caAddr,
			TrustDomain: td,
			Roots:       &caclient.BundleFile{Path: o.caRoots, TrustDomain: td},
			Credential:  token,
		}
		return c, func() { c.Close() }, nil
	case o.caDir != "":
		c, err := certs.LoadOrCreateCA(ctx, certs.FileStore{Dir: o.caDir}, td, certs.Options{}, log)
		if err != nil {
			return nil, nil, err
		}
		return c, func() {}, nil
	}
	return nil, nil, errors.New("no certificate issuer: give --ca-address (istiod-lite) or --ca-dir (in-process CA)")
}

// loadCapture loads (or picks up the pinned) eBPF capture for this node.
func loadCapture(o options, log *slog.Logger) (*bpf.Capture, error) {
	opts := bpf.Options{PinPath: o.bpfPinPath, Logger: log.With("component", "bpf")}
	if o.uplinks != "" {
		opts.Uplinks = strings.Split(o.uplinks, ",")
	}
	if o.probeCgroups != "" {
		opts.ProbeCgroups = strings.Split(o.probeCgroups, ",")
	}
	opts.AllowNodeAFXDP = o.allowNodeAFXDP
	for _, p := range []struct {
		addr string
		port *uint16
	}{{o.proxy.OutboundAddr, &opts.OutboundPort}, {o.proxy.InboundAddr, &opts.InboundPort}, {o.proxy.HBONEAddr, &opts.HBONEPort}} {
		ap, err := netip.ParseAddrPort(normalizeAddr(p.addr))
		if err != nil {
			return nil, fmt.Errorf("--capture needs numeric listener addresses: %w", err)
		}
		*p.port = ap.Port()
	}
	c, err := bpf.Load(opts)
	if err != nil {
		return nil, fmt.Errorf("load capture: %w", err)
	}
	if err := c.SetupNode(); err != nil {
		c.Close()
		return nil, fmt.Errorf("set up node capture: %w", err)
	}
	return c, nil
}

// ownCgroup moves the process out of the root cgroup, which it would share
// with every host process that has no cgroup of its own, into the root's
// child ambit-ztunnel. A ztunnel in a pod or a systemd unit has its own
// cgroup already and stays there.
func ownCgroup(log *slog.Logger) error {
	moved, err := bpf.LeaveRootCgroup("ambit-ztunnel")
	if err != nil {
		return fmt.Errorf("capture needs a cgroup v2 of ztunnel's own: %w", err)
	}
	if moved != "" {
		log.Info("moved out of the root cgroup: capture lets only this cgroup's marked packets reach pods directly", "cgroup", moved)
	}
	return nil
}

// probeCgroupRefresh is how often the probe cgroups' ids are read again.
const probeCgroupRefresh = 10 * time.Second

// normalizeAddr turns ":15001" into "0.0.0.0:15001".
func normalizeAddr(a string) string {
	if strings.HasPrefix(a, ":") {
		return "0.0.0.0" + a
	}
	return a
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// run starts the config source, the certificate manager and the proxy, and
// returns when the proxy has drained after ctx ends.
func run(ctx context.Context, o options) error {
	hopts := &slog.HandlerOptions{Level: o.logLevel}
	var h slog.Handler = slog.NewJSONHandler(os.Stderr, hopts)
	if !o.logJSON {
		h = slog.NewTextHandler(os.Stderr, hopts)
	}
	log := slog.New(h).With("node", o.node)
	if limit := setMemoryLimit(); limit > 0 {
		log.Info("go memory limit from the container's", "gomemlimit", limit)
	}

	switch {
	case o.configFile == "" && o.xdsAddr == "":
		return errors.New("no config source: give --xds-address (istiod-lite) or --config (a file)")
	case o.configFile != "" && o.xdsAddr != "":
		return errors.New("give --xds-address or --config, not both")
	case o.xdsAddr != "" && (o.caRoots == "" || o.tokenFile == ""):
		return errors.New("--xds-address needs --ca-roots (the roots istiod-lite's certificate chains to) and --token-file (istiod-lite authenticates xDS clients)")
	}
	if o.xdsAddr != "" && o.caAddr == "" && o.caDir == "" {
		o.caAddr = o.xdsAddr // istiod-lite serves xDS and certificates on one port
	}
	td, err := spiffeid.TrustDomainFromString(o.trustDomain)
	if err != nil {
		return fmt.Errorf("--trust-domain: %w", err)
	}
	// One bearer token for xDS and certificates, re-read at each call
	// (kubelet rotates projected tokens).
	token := &credential.Bearer{File: o.tokenFile}
	var mgr certs.Provider
	switch o.identity {
	case "spire":
		// SPIRE signs; istiod-lite still serves xDS (and its roots verify it).
		mgr = &spire.Delegated{AdminSocket: o.spireAdmin, Logger: log.With("component", "spire")}
	case "ca":
		issuer, closeIssuer, err := newIssuer(ctx, o, td, token, log)
		if err != nil {
			return err
		}
		defer closeIssuer()
		mgr = &certs.Manager{Issuer: issuer, Logger: log.With("component", "certs")}
	default:
		return fmt.Errorf("--identity %q: want ca or spire", o.identity)
	}
	defer mgr.Close()

	store := &model.Store{}
	var source func(ctx context.Context) error // keeps store in step with the config source
	var synced func() bool
	if o.xdsAddr != "" {
		roots := &caclient.BundleFile{Path: o.caRoots, TrustDomain: td}
		xc := &xdsclient.Client{
			Addr:       o.xdsAddr,
			TLS:        caclient.TLSConfig(roots, td, spiffeid.ID{}),
			Node:       o.node,
			Credential: token,
			Types:      xdsclient.WorkloadTypes(store),
			Logger:     log.With("component", "xds"),
		}
		source, synced = xc.Start, xc.Synced
	} else {
		watcher := &configfile.Watcher{Path: o.configFile, Store: store, Logger: log.With("component", "config")}
		if err := watcher.LoadOnce(); err != nil {
			return err
		}
		source = watcher.Run
	}

	cfg := o.proxy
	var refreshProbes func() error // with capture: kubelet's cgroup, re-read (a restart re-creates it)
	cfg.Synced = synced
	cfg.Store = store
	cfg.Certs = mgr
	cfg.Node = o.node
	cfg.RootNamespace = o.rootNamespace
	cfg.Logger = log
	if o.capture {
		// Before any socket exists (sockets keep the cgroup they were
		// made in): capture trusts the bypass mark only from ztunnel's
		// cgroup, which must be ztunnel's own.
		if err := ownCgroup(log); err != nil {
			return err
		}
		capture, err := loadCapture(o, log)
		if err != nil {
			return err
		}
		defer capture.Close() // the programs stay pinned: capture outlives a restart
		cfg.Capture = ztunnel.BPFCapture{Capture: capture}
		// The proxy's packets reach enrolled pods directly; other host
		// processes' get inbound capture.
		cfg.Mark |= capture.BypassMark()
		refreshProbes = capture.RefreshProbeCgroups
		if len(cfg.PodCIDRs) == 0 {
			log.Warn("capture is on without --pod-cidrs: a connection to a pod the config has not learned yet passes through in plain TCP; give the cluster's pod CIDRs")
		}
	}
	proxy, err := ztunnel.New(ctx, cfg)
	if err != nil {
		return err
	}
	defer proxy.Close()

	g, gctx := errgroup.WithContext(ctx)
	watchCtx, stopWatch := context.WithCancel(gctx)
	g.Go(func() error { return source(watchCtx) })
	g.Go(func() error { trimMemory(watchCtx); return nil })
	g.Go(func() error {
		defer stopWatch() // the proxy has drained: nothing left to configure
		return proxy.Run(gctx)
	})
	if refreshProbes != nil {
		g.Go(func() error {
			t := time.NewTicker(probeCgroupRefresh)
			defer t.Stop()
			for {
				select {
				case <-watchCtx.Done():
					return nil
				case <-t.C:
					if err := refreshProbes(); err != nil {
						log.Warn("refresh probe cgroups", "err", err)
					}
				}
			}
		})
	}
	start := time.Now()
	err = g.Wait()
	log.Info("ztunnel stopped", "uptime", time.Since(start).Round(time.Second).String())
	return err
}
