// Package server wires istiod-lite: a registry (Kubernetes or a YAML
// directory) builds the model, the xDS server streams it (workload types to
// node proxies, each waypoint's Envoy resources to that waypoint), and the
// certificate service signs workload certificates, both on one TLS gRPC port
// (15012) and both authenticating their clients' bearer tokens with one
// auth.Authenticator; a localhost admin port serves health and proxy-status.
//
// In Kubernetes mode it also runs the writers, on the one replica that
// holds the Lease ambit-system/istiod-lite-leader (istiod-lite/leader): the
// waypoint deployer (istiod-lite/deployer, whose Gateways' attachedRoutes
// are counted from each published model) and the status writer
// (istiod-lite/status), together for one term. Every replica serves xDS and
// certificates. Local mode has no deployer, no status writer and no
// election.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/ca"
	"github.com/ambit-mesh/ambit/istiod-lite/gate"
	"github.com/ambit-mesh/ambit/istiod-lite/monitoring"
	"github.com/ambit-mesh/ambit/istiod-lite/registry"
	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/istiod-lite/xds"
	"github.com/ambit-mesh/ambit/model"
)

// Config is istiod-lite's configuration (cmd/istiod-lite's flags).
type Config struct {
	// Listen is the xDS + CA address (default ":15012").
	Listen string
	// Admin is the admin HTTP address: /healthz, /readyz,
	// /debug/proxy-status, /debug/model, /debug/leader (default
	// "127.0.0.1:15014"; "-" disables). It serves /metrics too.
	Admin string
	// Monitoring is the address that serves only the Prometheus metrics
	// (/metrics), for a scraper: Istio's monitoring port is 15014, so the
	// manifest binds $(POD_IP):15014 next to the admin's 127.0.0.1:15014
	// (empty: none).
	Monitoring string

	// ConfigDir selects local mode: the model is read from this directory of
	// YAML objects instead of Kubernetes.
	ConfigDir string
	// Kubeconfig is the kubeconfig file in cluster mode; empty means
	// in-cluster. Rest, when set, is used instead (tests).
	Kubeconfig string
	Rest       *rest.Config

	// TrustDomain of workload identities (default cluster.local).
	TrustDomain string
	// ClusterID, DomainSuffix and RootNamespace parameterize translation
	// (translate.Options defaults).
	ClusterID, DomainSuffix, RootNamespace string

	// CADir, in local mode, holds the CA's key and certificate (created on
	// first start; default <ConfigDir>/.ambit-ca, which the registry skips).
	// In cluster mode the CA lives in the Secret CASecretNamespace/CASecretName
	// (ca.DefaultNamespace/ca.DefaultSecretName when empty).
	CADir                           string
	CASecretNamespace, CASecretName string
	// HostCredentials, in local mode, is the file of "<host> <secret>" lines
	// that hosts' ztunnels authenticate with, to the CA and to xDS (a host's
	// xDS Node id must be its name), and of "waypoint <namespace>/<name>
	// <secret>" lines for waypoints (format: package istiod-lite/auth);
	// without it both refuse all. The file is reloaded when it changes
	// (auth.HostFile): secrets rotate without a restart. In cluster mode ztunnels and waypoints
	// authenticate with their pod-bound service-account token (audience
	// auth.DefaultAudience) to both.
	HostCredentials string
	// CertTTL is the lifetime (and the cap) of issued workload certificates
	// (certs.DefaultLeafTTL when zero).
	CertTTL time.Duration
	// ProxyIdentity "spire" means SPIRE agents issue the proxies'
	// certificates: the certificate service is not served (xDS still
	// authenticates every caller; 15012's own certificate still comes from
	// the CA). Empty or "ca": istiod-lite signs for proxies.
	ProxyIdentity string
	// ServingDNSNames and ServingIPs are extra SANs of the 15012 certificate.
	ServingDNSNames []string
	ServingIPs      []net.IP

	// In cluster mode, one replica at a time deploys waypoints (package
	// istiod-lite/deployer) and writes statuses (istiod-lite/status): the
	// holder of the Lease istiod-lite-leader in $POD_NAMESPACE (default
	// ambit-system; package istiod-lite/leader);
	// every replica serves xDS and certificates. Local mode has neither
	// (nothing to deploy to, nowhere to write status).
	//
	// DisableLeaderElection runs them on this replica without a Lease: only
	// for a single replica.
	DisableLeaderElection bool
	// LeaderIdentity is this replica's name in the Lease (default: the
	// POD_NAME environment variable, else the host name).
	LeaderIdentity string
	// LeaseDuration, RenewDeadline and RetryPeriod tune the election
	// (leader's defaults when zero: 15 s, 10 s, 2 s).
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	// WaypointImage is the waypoint Deployments' container image (default
	// deployer.DefaultImage); WaypointXDSAddress is the xDS and CA address
	// waypoints are given (default deployer.DefaultXDS).
	WaypointImage, WaypointXDSAddress string

	// Admission of 15012 (istiod-lite/gate): open connections per source
	// IP and in total, and calls per second per source IP (the gate's
	// defaults when zero). Each connection carries at most
	// MaxStreamsPerConn calls at once.
	MaxConnsPerSource, MaxConns int
	CallsPerSecond              float64
	// MaxConnectionAge ends a 15012 connection after this long (gRPC
	// GOAWAY, then MaxConnectionAgeGrace for its calls; xDS streams are cut
	// then): clients reconnect and authenticate again, so a credential that
	// is no longer valid (a deleted pod's token) stops receiving the mesh
	// (DefaultMaxConnectionAge if zero, as Istio's default).
	MaxConnectionAge time.Duration
	// TokenIssuers, in cluster mode, are the issuers (iss claim) a token
	// must have to be sent to a TokenReview (auth.JWTFilter); empty: the
	// API server's, from its OpenID discovery document (any issuer if that
	// cannot be read).
	TokenIssuers []string

	Logger *slog.Logger // may be nil

	// Listening, when set, is called with the bound addresses (tests, and
	// ":0" listeners).
	Listening func(grpcAddr, adminAddr string)
	// MonitoringListening, when set, is called with the monitoring
	// listener's address once it is bound.
	MonitoringListening func(addr string)

	gateStats *gate.Stats // tests: what 15012's connections read
	// connAgeGrace replaces MaxConnectionAgeGrace (tests).
	connAgeGrace time.Duration
}

func (c *Config) defaults() {
	if c.Listen == "" {
		c.Listen = ":15012"
	}
	if c.Admin == "" {
		c.Admin = "127.0.0.1:15014"
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.ConfigDir != "" && c.CADir == "" {
		c.CADir = filepath.Join(c.ConfigDir, ".ambit-ca")
	}
}

// source is a registry: it runs until ctx ends and says when its first model
// is published.
type source interface {
	Start(ctx context.Context) error
	Synced() <-chan struct{}
}

// Run runs istiod-lite until ctx ends.
func Run(ctx context.Context, cfg Config) error {
	cfg.defaults()
	log := cfg.Logger
	if cfg.ProxyIdentity != "" && cfg.ProxyIdentity != "ca" && cfg.ProxyIdentity != "spire" {
		return fmt.Errorf("proxy identity %q: want ca or spire", cfg.ProxyIdentity)
	}
	td := identity.DefaultTrustDomain
	if cfg.TrustDomain != "" {
		t, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
		if err != nil {
			return fmt.Errorf("trust domain: %w", err)
		}
		td = t
	}
	opts := translate.Options{ClusterID: cfg.ClusterID, DomainSuffix: cfg.DomainSuffix, RootNamespace: cfg.RootNamespace}
	if td != identity.DefaultTrustDomain {
		opts.TrustDomain = td.Name()
	}
	store := &model.Store{}
	g, ctx := errgroup.WithContext(ctx)

	var src source
	var caServer *ca.Server // its Authenticator authenticates xDS clients too
	var ctrls *controllers  // cluster mode's writers
	if cfg.ConfigDir != "" {
		log.Info("local mode", "dir", cfg.ConfigDir)
		src = &registry.Files{Dir: cfg.ConfigDir, Store: store, Options: opts, Logger: log.With("component", "registry")}
		authority, err := certs.LoadOrCreateCA(ctx, certs.FileStore{Dir: cfg.CADir}, td, certs.Options{LeafTTL: cfg.CertTTL}, log)
		if err != nil {
			return fmt.Errorf("ca: %w", err)
		}
		hosts, err := hostAuth(cfg.HostCredentials, td, log)
		if err != nil {
			return err
		}
		if hf, ok := hosts.(*auth.HostFile); ok {
			g.Go(func() error { return hf.Start(ctx) })
		}
		caServer = &ca.Server{CA: authority, Authenticator: hosts, Workloads: ca.StoreWorkloads{Store: store}, Logger: log.With("component", "ca")}
	} else {
		rc := cfg.Rest
		if rc == nil {
			var err error
			if cfg.Kubeconfig != "" {
				rc, err = clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
			} else {
				rc, err = rest.InClusterConfig()
			}
			if err != nil {
				return fmt.Errorf("kubernetes config: %w", err)
			}
		}
		rc = rest.CopyConfig(rc)
		rc.QPS, rc.Burst = 50, 100
		cs, err := kubernetes.NewForConfig(rc)
		if err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		dyn, err := dynamic.NewForConfig(rc)
		if err != nil {
			return fmt.Errorf("kubernetes dynamic client: %w", err)
		}
		gw, err := gwclient.NewForConfig(rc)
		if err != nil {
			return fmt.Errorf("gateway api client: %w", err)
		}
		src = &registry.Kubernetes{Client: cs, Dynamic: dyn, Store: store, Options: opts, Logger: log.With("component", "registry")}
		ctrls = newControllers(&cfg, cs, gw, dyn, opts, log)
		authority, err := certs.LoadOrCreateCA(ctx, ca.SecretStore{Client: cs, Namespace: cfg.CASecretNamespace, Name: cfg.CASecretName}, td, certs.Options{LeafTTL: cfg.CertTTL}, log)
		if err != nil {
			return fmt.Errorf("ca: %w", err)
		}
		// ztunnels mount the roots from this ConfigMap to verify 15012.
		if err := ca.PublishBundle(ctx, cs, cfg.CASecretNamespace, "", authority.Bundle()); err != nil {
			return fmt.Errorf("ca: %w", err)
		}
		pods := &ca.PodIndex{Client: cs, Logger: log.With("component", "ca-pods")}
		g.Go(func() error { return pods.Start(ctx) })
		// A token costs one TokenReview (and pod Get) until it expires or
		// for auth.DefaultCacheMaxAge; a refused one is refused from memory.
		// Tokens that cannot be valid (not a JWT, another issuer, not for
		// istio-ca, expired) are refused before they cost a review; each
		// source IP has a share of the reviews in flight.
		filter := &auth.JWTFilter{Issuers: cfg.TokenIssuers}
		if len(filter.Issuers) == 0 {
			filter.Issuers = tokenIssuers(ctx, cs, log)
		}
		tokens := &auth.Cache{Authenticator: &auth.KubeAuthenticator{Client: cs, TrustDomain: td}, Precheck: filter.Check}
		caServer = &ca.Server{CA: authority, Authenticator: tokens, Workloads: pods, Logger: log.With("component", "ca")}
	}

	// Refused calls are logged a few lines and a count per interval.
	refusals := &auth.RefusalLog{Logger: log.With("component", "gate")}
	g.Go(func() error { return refusals.Start(ctx) })
	caServer.Refusals = refusals
	metrics := monitoring.New()
	caServer.Metrics = metrics
	gateStats := cfg.gateStats
	if gateStats == nil {
		gateStats = &gate.Stats{}
	}
	gateStats.Metrics = metrics
	serving := &ca.ServingCert{CA: caServer.CA, DNSNames: cfg.ServingDNSNames, IPAddresses: cfg.ServingIPs}
	xdsServer := xds.New(store, log.With("component", "xds"))
	xdsServer.Refusals = refusals
	xdsServer.Metrics = metrics
	// Every call is authenticated by the gate's tap before its stream
	// exists (no request body is read for a refused one); the services take
	// the caller from the call's context. The certificate service's calls
	// get a request limit sized for a CSR on the wire.
	admit := &gate.Tap{Authenticator: caServer.Authenticator, CallsPerSecond: cfg.CallsPerSecond, Refusals: refusals, Metrics: metrics}
	creds := gate.Creds(credentials.NewTLS(serving.TLSConfig()), []gate.Limit{{Prefix: ca.MethodPrefix, MaxBytes: ca.MaxRequestSize}}, MaxHeaderListSize, gateStats)
	gs := grpc.NewServer(append(xds.ServerOptions(),
		grpc.Creds(creds),
		grpc.InTapHandle(admit.Handle),
		// xDS serves node proxies and waypoints, each what its kind may
		// read.
		grpc.ChainStreamInterceptor(xdsServer.RequireAuthentication(caServer.Authenticator)),
		grpc.MaxConcurrentStreams(MaxStreamsPerConn),
		grpc.MaxHeaderListSize(MaxHeaderListSize),
		grpc.ConnectionTimeout(10*time.Second), // TLS handshake and HTTP/2 preface
		// Connections are renewed every MaxConnectionAge: their clients
		// authenticate again. (A stream also ends when its token expires:
		// xds.Server.RequireAuthentication.)
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second,
			MaxConnectionAge: cmpOr(cfg.MaxConnectionAge, DefaultMaxConnectionAge), MaxConnectionAgeGrace: cmpOr(cfg.connAgeGrace, MaxConnectionAgeGrace)}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)...)
	xdsServer.Register(gs)
	if cfg.ProxyIdentity == "spire" {
		log.Info("proxies take their certificates from SPIRE: certificate service off")
	} else {
		caServer.Register(gs)
	}

	var admin net.Listener
	if cfg.Admin != "-" {
		var err error
		if admin, err = net.Listen("tcp", cfg.Admin); err != nil {
			return fmt.Errorf("admin listen: %w", err)
		}
	}
	metricsHandler := promhttp.HandlerFor(metrics.Registry, promhttp.HandlerOpts{})
	if cfg.Monitoring != "" {
		mon, err := net.Listen("tcp", cfg.Monitoring)
		if err != nil {
			if admin != nil {
				admin.Close()
			}
			return fmt.Errorf("monitoring listen: %w", err)
		}
		if cfg.MonitoringListening != nil {
			cfg.MonitoringListening(mon.Addr().String())
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", metricsHandler)
		g.Go(func() error { return serveHTTP(ctx, mon, mux, "monitoring") })
	}

	g.Go(func() error { return src.Start(ctx) })
	if ctrls != nil {
		g.Go(func() error { return ctrls.Start(ctx, store, src.Synced()) })
	}
	g.Go(func() error { return xdsServer.Start(ctx) })
	g.Go(func() error {
		// Clients are served once the first model is published: a ztunnel
		// must not take an empty model for the mesh.
		select {
		case <-ctx.Done():
			return nil
		case <-src.Synced():
		}
		// Listening only now also makes a TCP readiness probe on 15012 mean
		// "the model is built".
		raw, err := net.Listen("tcp", cfg.Listen)
		if err != nil {
			return fmt.Errorf("listen: %w", err)
		}
		lis := &gate.Listener{Listener: raw, PerSource: cfg.MaxConnsPerSource, Total: cfg.MaxConns, Refused: func(src, reason string) {
			refusals.Refuse("connection refused", src, "reason", reason)
			if reason == gate.ReasonPerSource {
				metrics.Refused(monitoring.RefusedConnectionsPerSource)
			} else {
				metrics.Refused(monitoring.RefusedConnections)
			}
		}}
		if cfg.Listening != nil {
			a := ""
			if admin != nil {
				a = admin.Addr().String()
			}
			cfg.Listening(lis.Addr().String(), a)
		}
		log.Info("serving xDS and CA", "addr", lis.Addr().String(), "trustDomain", td.Name())
		go func() {
			<-ctx.Done()
			stopGracefully(gs, 5*time.Second)
		}()
		if err := gs.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return fmt.Errorf("grpc: %w", err)
		}
		return nil
	})
	if admin != nil {
		mux := adminMux(store, xdsServer, src, ctrls)
		mux.Handle("/metrics", metricsHandler)
		g.Go(func() error { return serveHTTP(ctx, admin, mux, "admin") })
	}
	return g.Wait()
}

// serveHTTP serves h on l until ctx ends.
func serveHTTP(ctx context.Context, l net.Listener, h http.Handler, what string) error {
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		hs.Close()
	}()
	if err := hs.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// Limits of 15012's gRPC server.
const (
	// MaxStreamsPerConn bounds one connection's concurrent calls (a ztunnel
	// has one xDS stream and a few CSRs at once).
	MaxStreamsPerConn = 32
	// MaxHeaderListSize bounds a call's headers (a bearer token is ~1 KiB).
	MaxHeaderListSize = 64 << 10
	// DefaultMaxConnectionAge is Config.MaxConnectionAge's default
	// (Istio's); gRPC adds a jitter of ±10%.
	DefaultMaxConnectionAge = 30 * time.Minute
	// MaxConnectionAgeGrace is how long a connection past its age has for
	// its calls before it is closed (Istio's default).
	MaxConnectionAgeGrace = 10 * time.Second
)

func cmpOr(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// tokenIssuers returns the API server's service-account token issuer, from
// its OpenID discovery document (readable by every service account: the
// default binding system:service-account-issuer-discovery), or nil (any
// issuer) if it cannot be read.
func tokenIssuers(ctx context.Context, cs kubernetes.Interface, log *slog.Logger) []string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	raw, err := cs.Discovery().RESTClient().Get().AbsPath("/.well-known/openid-configuration").DoRaw(ctx)
	var doc struct {
		Issuer string `json:"issuer"`
	}
	if err == nil {
		err = json.Unmarshal(raw, &doc)
	}
	if err == nil && doc.Issuer == "" {
		err = errors.New("no issuer")
	}
	if err != nil {
		log.Warn("token issuer unknown: tokens of any issuer go to TokenReview (set --token-issuer)", "err", err)
		return nil
	}
	log.Info("token issuer", "issuer", doc.Issuer)
	return []string{doc.Issuer}
}

// hostAuth is local mode's authenticator: the credentials file, reloaded
// when it changes (auth.HostFile), or no one.
func hostAuth(path string, td spiffeid.TrustDomain, log *slog.Logger) (auth.Authenticator, error) {
	if path == "" {
		log.Warn("no host credentials file: the CA and xDS refuse every host")
		return auth.NewHostAuthenticator(nil)
	}
	hf := &auth.HostFile{Path: path, TrustDomain: td, Logger: log.With("component", "host-credentials")}
	if err := hf.Load(); err != nil {
		return nil, err
	}
	return hf, nil
}

func stopGracefully(gs *grpc.Server, timeout time.Duration) {
	done := make(chan struct{})
	go func() { gs.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
		gs.Stop() // xDS streams never end by themselves
	}
}

func adminMux(store *model.Store, x *xds.Server, src source, ctrls *controllers) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/leader", func(w http.ResponseWriter, _ *http.Request) {
		// Whether this replica deploys waypoints and writes status now
		// (never in local mode).
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]bool{"leading": ctrls != nil && ctrls.Leading()})
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		select {
		case <-src.Synced():
			fmt.Fprintln(w, "ok")
		default:
			http.Error(w, "model not built yet", http.StatusServiceUnavailable)
		}
	})
	mux.Handle("/debug/proxy-status", x)
	mux.HandleFunc("/debug/model", func(w http.ResponseWriter, _ *http.Request) {
		s := store.Load()
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(map[string]any{
			"workloads": s.Workloads, "services": s.Services, "policies": s.Policies,
			"peerAuthentications": s.PeerAuthn, "httpRoutes": s.HTTPRoutes,
		})
	})
	return mux
}
