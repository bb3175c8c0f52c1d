// Command waypoint is ambit's optional L7 proxy for a namespace, service or
// workload: it terminates HBONE, routes HTTP by the Envoy v3 resources
// istiod-lite serves (canary splits, retries, timeouts, circuit breaking,
// outlier detection, mirroring, L7 policy) and re-tunnels to the
// destination's ztunnel with its own identity.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/certs/spire"
	"github.com/ambit-mesh/ambit/credential"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/model"
	"github.com/ambit-mesh/ambit/waypoint"
	"github.com/ambit-mesh/ambit/xdsclient"
)

// options are the command line.
type options struct {
	node, gateway             string
	namespace, serviceAccount string
	trustDomain               string
	xdsAddr, caAddr, caRoots  string
	caDir, tokenFile          string
	identity                  string // ca or spire
	spireSocket, spireAdmin   string // the SPIRE agent's Workload API and admin sockets
	configFile                string
	proxy                     waypoint.Config // listener addresses, drain, limits
	logLevel                  slog.Level
	logJSON                   bool
}

func main() {
	fs := flag.NewFlagSet("waypoint", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `waypoint: ambit's L7 proxy.

It terminates HBONE on 15008 with its own SPIFFE identity
(spiffe://<trust domain>/ns/<namespace>/sa/<service account>), serves the
tunnelled HTTP/1.1, HTTP/2 and gRPC by the Envoy v3 Listener, RouteConfiguration,
Cluster and ClusterLoadAssignment resources istiod-lite sends (waypoint/ENVOY.md),
and forwards to the destination's ztunnel over HBONE. Admin (config_dump,
clusters) on 15000 (localhost), metrics on 15020, readiness on 15021.

Config: --xds-address streams it from istiod-lite (Delta ADS over TLS checked
against --ca-roots, authenticated with --token-file), or --config names a
JSON DiscoveryResponse ({"resources": [{"@type": ...}, ...]}) for local runs.
Certificates: istiod-lite's certificate service (--ca-address, by default the
--xds-address), or --ca-dir for an in-process CA; with --identity=spire,
the node's SPIRE agent (Workload API on --spire-socket; docs/spire.md).

Usage: waypoint [flags]

`)
		fs.PrintDefaults()
	}
	var o options
	host, _ := os.Hostname()
	fs.StringVar(&o.node, "node", envOr("POD_NAME", host), "xDS node id: the pod name ($POD_NAME)")
	fs.StringVar(&o.gateway, "gateway", os.Getenv("GATEWAY_NAME"), "the waypoint Gateway's name; node.cluster is <namespace>/<gateway> ($GATEWAY_NAME)")
	fs.StringVar(&o.namespace, "namespace", os.Getenv("POD_NAMESPACE"), "the waypoint's namespace ($POD_NAMESPACE)")
	fs.StringVar(&o.serviceAccount, "service-account", os.Getenv("SERVICE_ACCOUNT"), "the waypoint's service account, the Gateway's name by default ($SERVICE_ACCOUNT)")
	fs.StringVar(&o.trustDomain, "trust-domain", envOr("TRUST_DOMAIN", identity.DefaultTrustDomain.Name()), "SPIFFE trust domain ($TRUST_DOMAIN)")
	fs.StringVar(&o.xdsAddr, "xds-address", os.Getenv("XDS_ADDRESS"), "istiod-lite's address (host:15012); needs --ca-roots and --token-file ($XDS_ADDRESS)")
	fs.StringVar(&o.caAddr, "ca-address", os.Getenv("CA_ADDRESS"), "istiod-lite's certificate service (default: --xds-address) ($CA_ADDRESS)")
	fs.StringVar(&o.caRoots, "ca-roots", os.Getenv("CA_ROOTS"), "PEM roots istiod-lite's serving certificate chains to ($CA_ROOTS)")
	fs.StringVar(&o.tokenFile, "token-file", os.Getenv("TOKEN_FILE"), "bearer token for istiod-lite (audience istio-ca), re-read per call ($TOKEN_FILE)")
	fs.StringVar(&o.caDir, "ca-dir", "", "in-process CA directory (local runs)")
	fs.StringVar(&o.configFile, "config", "", "local mode: a JSON DiscoveryResponse of the Envoy resources")
	fs.StringVar(&o.identity, "identity", envOr("IDENTITY", "ca"), "where the waypoint's certificate comes from: ca (istiod-lite, or --ca-dir) or spire (the node's SPIRE agent) ($IDENTITY)")
	fs.StringVar(&o.spireSocket, "spire-socket", envOr("SPIRE_SOCKET", "/run/spire/sockets/agent.sock"), "--identity=spire: the SPIRE agent's Workload API socket; the agent attests this process ($SPIRE_SOCKET)")
	fs.StringVar(&o.spireAdmin, "spire-admin-socket", "", "--identity=spire: the SPIRE agent's admin socket instead (Delegated Identity API; the waypoint must be an authorized delegate)")
	fs.StringVar(&o.proxy.HBONEAddr, "hbone-addr", fmt.Sprintf(":%d", model.PortHBONE), "HBONE listener")
	fs.StringVar(&o.proxy.AdminAddr, "admin-addr", fmt.Sprintf("127.0.0.1:%d", model.PortAdmin), "admin listener; keep it on localhost")
	fs.StringVar(&o.proxy.MetricsAddr, "metrics-addr", fmt.Sprintf(":%d", model.PortMetrics), "Prometheus metrics listener")
	fs.BoolVar(&o.proxy.QUIC, "hbone-quic", os.Getenv("AMBIT_HBONE_QUIC") == "true", "HBONE over HTTP/3 (QUIC): also serve it on UDP at --hbone-addr, with the same identity, policy and drain as HTTP/2; ztunnels use it where the waypoint's pod advertises it (label ambit.dev/hbone-quic=enabled) ($AMBIT_HBONE_QUIC=true)")
	fs.BoolVar(&o.proxy.QUICUpstream, "hbone-quic-upstream", os.Getenv("AMBIT_HBONE_QUIC_UPSTREAM") == "true", "dial HBONE over HTTP/3 to destinations that advertise it (EDS hbone_quic) on other nodes, HTTP/2 where UDP is blocked, without serving QUIC; --hbone-quic implies it ($AMBIT_HBONE_QUIC_UPSTREAM=true)")
	fs.DurationVar(&o.proxy.QUICDialTimeout, "hbone-quic-dial-timeout", 0, "how long an upstream QUIC dial may take before falling back to HTTP/2 (0: 2s)")
	fs.StringVar(&o.proxy.Node, "node-name", os.Getenv("NODE_NAME"), "this pod's node: destinations on it are dialled over HTTP/2 ($NODE_NAME)")
	fs.StringVar(&o.proxy.ReadyAddr, "ready-addr", fmt.Sprintf(":%d", model.PortReady), "readiness listener, /healthz/ready")
	fs.DurationVar(&o.proxy.DrainDuration, "drain-duration", envDuration("TERMINATION_DRAIN_DURATION", 5*time.Second),
		"after SIGTERM: how long the waypoint fails readiness but keeps accepting, telling clients to reconnect, before it stops accepting (Istio's terminationDrainDuration) ($TERMINATION_DRAIN_DURATION)")
	fs.DurationVar(&o.proxy.DrainTimeout, "drain-timeout", 20*time.Second, "after the drain duration: how long in-flight requests may finish (keep both within the pod's terminationGracePeriodSeconds)")
	fs.Int64Var(&o.proxy.MaxRequestBodyBytes, "max-request-body-bytes", 0, "413 above this request body size (0: no limit)")
	fs.Int64Var(&o.proxy.RetryBufferBytes, "retry-buffer-bytes", 64<<10, "request bodies up to this size are buffered for retries and mirrors")
	fs.TextVar(&o.logLevel, "log-level", slog.LevelInfo, "debug, info, warn or error")
	fs.BoolVar(&o.logJSON, "log-json", true, "JSON logs (text when false)")
	_ = fs.Parse(os.Args[1:])

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "waypoint:", err)
		os.Exit(1)
	}
}

// envDuration is the duration in $key, else def (an unparsable value is
// reported and ignored).
func envDuration(key string, def time.Duration) time.Duration {
	v := os.Getenv(key)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		fmt.Fprintf(os.Stderr, "waypoint: $%s: %v (using %s)\n", key, err, def)
		return def
	}
	return d
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func newIssuer(ctx context.Context, o options, td spiffeid.TrustDomain, token *credential.Bearer, log *slog.Logger) (certs.Issuer, func(), error) {
	switch {
	case o.caAddr != "" && o.caDir != "":
		return nil, nil, errors.New("give --ca-address or --ca-dir, not both")
	case o.caAddr != "":
		if o.caRoots == "" || o.tokenFile == "" {
			return nil, nil, errors.New("--ca-address needs --ca-roots and --token-file")
		}
		c := &caclient.Client{Addr: o.caAddr, TrustDomain: td, Roots: &caclient.BundleFile{Path: o.caRoots, TrustDomain: td}, Credential: token}
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

// loadFile reads a JSON DiscoveryResponse into resources.
func loadFile(path string) ([]waypoint.Resource, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var dr discovery.DiscoveryResponse
	if err := protojson.Unmarshal(b, &dr); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var rs []waypoint.Resource
	for i, a := range dr.GetResources() {
		m, err := a.UnmarshalNew()
		if err != nil {
			return nil, fmt.Errorf("%s: resources[%d]: %w", path, i, err)
		}
		rs = append(rs, waypoint.Resource{Version: dr.GetVersionInfo(), Resource: m})
	}
	return rs, nil
}

func run(ctx context.Context, o options) error {
	hopts := &slog.HandlerOptions{Level: o.logLevel}
	var h slog.Handler = slog.NewJSONHandler(os.Stderr, hopts)
	if !o.logJSON {
		h = slog.NewTextHandler(os.Stderr, hopts)
	}
	log := slog.New(h).With("node", o.node)
	switch {
	case o.configFile == "" && o.xdsAddr == "":
		return errors.New("no config source: give --xds-address (istiod-lite) or --config (a file)")
	case o.configFile != "" && o.xdsAddr != "":
		return errors.New("give --xds-address or --config, not both")
	case o.xdsAddr != "" && (o.caRoots == "" || o.tokenFile == ""):
		return errors.New("--xds-address needs --ca-roots and --token-file")
	case o.namespace == "":
		return errors.New("--namespace is required")
	}
	if o.serviceAccount == "" {
		o.serviceAccount = o.gateway
	}
	if o.xdsAddr != "" && o.caAddr == "" && o.caDir == "" {
		o.caAddr = o.xdsAddr
	}
	td, err := spiffeid.TrustDomainFromString(o.trustDomain)
	if err != nil {
		return fmt.Errorf("--trust-domain: %w", err)
	}
	id, err := identity.Workload(td, o.namespace, o.serviceAccount)
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	token := &credential.Bearer{File: o.tokenFile}
	var mgr certs.Provider
	switch {
	case o.identity == "spire" && o.spireAdmin != "":
		mgr = &spire.Delegated{AdminSocket: o.spireAdmin, Logger: log.With("component", "spire")}
	case o.identity == "spire":
		mgr = &spire.Workload{Socket: o.spireSocket, Logger: log.With("component", "spire")}
	case o.identity == "ca":
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
	mgr.SetIdentities([]spiffeid.ID{id})

	cfg := o.proxy
	cfg.Identity, cfg.Certs = id, mgr
	cfg.Logger = log
	cfg.AccessLog = log.With("component", "access")
	proxy, err := waypoint.New(cfg)
	if err != nil {
		return err
	}
	defer proxy.Close()

	g, gctx := errgroup.WithContext(ctx)
	if o.xdsAddr != "" {
		roots := &caclient.BundleFile{Path: o.caRoots, TrustDomain: td}
		xc := &xdsclient.Client{
			Addr:       o.xdsAddr,
			TLS:        caclient.TLSConfig(roots, td, spiffeid.ID{}),
			NodeInfo:   &corev3.Node{Id: o.node, Cluster: o.namespace + "/" + o.gateway},
			Credential: token,
			Types:      waypoint.XDSTypes(),
			OnUpdate:   proxy.OnXDSUpdate,
			Logger:     log.With("component", "xds"),
		}
		xctx, stopXDS := context.WithCancel(gctx)
		defer stopXDS()
		g.Go(func() error { return xc.Start(xctx) })
	} else {
		rs, err := loadFile(o.configFile)
		if err != nil {
			return err
		}
		if err := proxy.Apply(rs); err != nil {
			return err
		}
	}
	g.Go(func() error { return proxy.Start(gctx) })
	start := time.Now()
	err = g.Wait()
	log.Info("waypoint stopped", "uptime", time.Since(start).Round(time.Second).String())
	return err
}
