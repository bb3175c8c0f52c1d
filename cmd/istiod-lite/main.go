// Command istiod-lite is ambit's control plane: it watches Kubernetes (or a
// directory of the same YAML), serves Delta xDS to ztunnels and waypoints and
// signs workload certificates, all on 15012.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
	"github.com/ambit-mesh/ambit/istiod-lite/server"
)

func main() {
	fs := flag.NewFlagSet("istiod-lite", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `istiod-lite: ambit's control plane.

It builds one model of workloads, services and policies from Kubernetes (or
from a directory of the same YAML objects in local mode), streams it to
ztunnels (workloads, services, policies) and waypoints (their Envoy listeners,
routes, clusters and endpoints) over Delta xDS, and signs SPIFFE workload
certificates, all over TLS on 15012. /healthz, /readyz, /debug/proxy-status, /debug/model and /metrics are on the
admin address; --monitoring-addr serves /metrics alone to a scraper.

In cluster mode it also deploys a waypoint (ServiceAccount, Deployment,
Service) for each Gateway of class istio-waypoint and writes the status of
Gateways, HTTPRoutes, GRPCRoutes, Services and AuthorizationPolicies: only the
replica holding the Lease ambit-system/istiod-lite-leader does, so several
replicas can serve xDS side by side. Local mode does neither.

Usage: istiod-lite [flags]

`)
		fs.PrintDefaults()
	}
	var cfg server.Config
	var sans, level string
	fs.StringVar(&cfg.Listen, "listen", ":15012", "xDS and CA `address` (TLS gRPC)")
	fs.StringVar(&cfg.Admin, "admin", "127.0.0.1:15014", "admin HTTP `address` (\"-\" disables)")
	fs.StringVar(&cfg.Monitoring, "monitoring-addr", "", "`address` serving only Prometheus metrics (/metrics) to scrapers, e.g. $(POD_IP):15014 beside the admin's 127.0.0.1:15014 (default: none; the admin address serves /metrics too)")
	fs.StringVar(&cfg.ConfigDir, "config-dir", "", "local mode: read the model from this `directory` of YAML objects instead of Kubernetes")
	fs.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "kubeconfig `file` (default: in-cluster)")
	fs.StringVar(&cfg.TrustDomain, "trust-domain", "cluster.local", "SPIFFE trust `domain`")
	fs.StringVar(&cfg.ClusterID, "cluster-id", "", "cluster `name` in workload UIDs and baggage (default Kubernetes)")
	fs.StringVar(&cfg.DomainSuffix, "domain-suffix", "", "service DNS `suffix` (default cluster.local)")
	fs.StringVar(&cfg.RootNamespace, "root-namespace", "", "`namespace` whose policies are mesh-wide (default ambit-system)")
	fs.StringVar(&cfg.CADir, "ca-dir", "", "local mode: `directory` of the CA key and certificate, created if empty (default <config-dir>/.ambit-ca)")
	fs.StringVar(&cfg.CASecretNamespace, "ca-secret-namespace", "", "cluster mode: `namespace` of the CA Secret (default ambit-system)")
	fs.StringVar(&cfg.CASecretName, "ca-secret-name", "", "cluster mode: `name` of the CA Secret (default ambit-ca)")
	fs.DurationVar(&cfg.CertTTL, "cert-ttl", 0, "lifetime of workload certificates (default 24h); proxies renew at half of it")
	fs.StringVar(&cfg.ProxyIdentity, "identity", "ca", "who signs the proxies' certificates: ca (this istiod-lite) or spire (SPIRE agents: the certificate service is off; xDS still authenticates)")
	fs.StringVar(&cfg.HostCredentials, "host-credentials", "", "local mode: `file` of \"<host> <secret>\" and \"waypoint <namespace>/<name> <secret>\" lines hosts and waypoints authenticate with")
	fs.IntVar(&cfg.MaxConnsPerSource, "max-conns-per-source", 0, "open connections to 15012 per source IP (default 32)")
	fs.IntVar(&cfg.MaxConns, "max-conns", 0, "open connections to 15012 in total (default 4096)")
	fs.Float64Var(&cfg.CallsPerSecond, "calls-per-second", 0, "calls to 15012 per second per source IP, burst 200 (default 50)")
	fs.DurationVar(&cfg.MaxConnectionAge, "max-connection-age", 0, "renew 15012 connections after this long, so that clients authenticate again (default 30m)")
	fs.Func("token-issuer", "cluster mode: `issuer` (iss) a token must have to be sent to a TokenReview; repeatable (default: the API server's, from its OpenID discovery document)", func(v string) error {
		cfg.TokenIssuers = append(cfg.TokenIssuers, v)
		return nil
	})
	leaderElect := fs.Bool("leader-elect", true, "cluster mode: deploy waypoints and write statuses only while holding the Lease ambit-system/istiod-lite-leader, so that replicas can run side by side (false: always, for a single replica)")
	fs.StringVar(&cfg.LeaderIdentity, "leader-identity", "", "cluster mode: this replica's `name` in the Lease (default $POD_NAME, else the host name)")
	fs.StringVar(&cfg.WaypointImage, "waypoint-image", deployer.DefaultImage, "cluster mode: waypoint Deployments' container `image`")
	fs.StringVar(&cfg.WaypointXDSAddress, "waypoint-xds-address", deployer.DefaultXDS, "cluster mode: xDS and CA `address` given to waypoints")
	fs.StringVar(&sans, "serving-sans", "", "extra comma-separated DNS names and IPs of the 15012 certificate")
	fs.StringVar(&level, "log-level", "info", "debug, info, warn or error")
	_ = fs.Parse(os.Args[1:])

	cfg.DisableLeaderElection = !*leaderElect
	for _, s := range strings.Split(sans, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		if ip := net.ParseIP(s); ip != nil {
			cfg.ServingIPs = append(cfg.ServingIPs, ip)
		} else {
			cfg.ServingDNSNames = append(cfg.ServingDNSNames, s)
		}
	}
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		fmt.Fprintln(os.Stderr, "istiod-lite: --log-level:", err)
		os.Exit(2)
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lv}))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := server.Run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "istiod-lite:", err)
		os.Exit(1)
	}
}
