// Command meshbench is make bench's end-to-end benchmark: direct pod to pod,
// an HAProxy mutual-TLS pair and ambit's ztunnels on a network-namespace
// topology, interleaved; it writes latest.json, latest.md and latency plots.
// It needs root (namespaces, eBPF). See bench/README.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ambit-mesh/ambit/bench"
)

func main() {
	var cfg bench.Config
	out := flag.String("out", "bench/results", "directory for latest.json, latest.md and the plots")
	paths := flag.String("paths", "direct,haproxy,ambit,quic,waypoint,nginx,haproxy-http", "paths to measure, comma-separated (direct is the L7 paths' baseline too; ambit and quic together also compare HTTP/2 and HTTP/3 across a delay line)")
	short := flag.Bool("short", false, "a smoke run: 1 round, 3 s latency and throughput runs, 2 s connection-rate runs, no profiles, no RSS floor")
	micro := flag.String("microbench", "", "go test -bench output to include in the report")
	reportOnly := flag.String("report-only", "", "re-render the report from this latest.json instead of measuring")
	flag.StringVar(&cfg.RepoDir, "repo", "", "module root to build ./cmd/ztunnel from (default: found from the working directory)")
	flag.StringVar(&cfg.WorkDir, "work", "", "work directory for configs and logs (default: a temporary one)")
	flag.BoolVar(&cfg.KeepWork, "keep-work", false, "keep the temporary work directory")
	flag.IntVar(&cfg.Rounds, "rounds", 3, "rounds of every workload on every path")
	flag.IntVar(&cfg.QPS, "qps", 1000, "request rate of the latency runs")
	flag.IntVar(&cfg.Payload, "payload", 1024, "request and response body of the latency runs (bytes)")
	flag.DurationVar(&cfg.LatencyTime, "latency-time", 0, "length of one latency run (default 10s)")
	flag.DurationVar(&cfg.ThroughputTime, "throughput-time", 0, "length of one iperf3 run (default 5s)")
	flag.DurationVar(&cfg.ConnRateTime, "connrate-time", 0, "length of one new-connection run (default 3s)")
	profile := flag.Bool("profile", true, "after the rounds, take pprof CPU and heap profiles of the ztunnels (into <out>/pprof)")
	flag.IntVar(&cfg.Nice, "nice", -10, "niceness of every process the harness starts, the same on every path (0: leave alone)")
	ztEnv := flag.String("ztunnel-env", "", "extra environment for the ztunnels, comma-separated KEY=value (e.g. GOMAXPROCS=1)")
	linkRSS := flag.Bool("link-rss", true, "measure the idle RSS of programs linking ztunnel's imports")
	conns := flag.String("connections", "1,64", "connection counts of the latency runs")
	verbose := flag.Bool("v", true, "log progress")
	flag.Parse()
	if *short {
		cfg.Rounds, cfg.LatencyTime, cfg.ThroughputTime, cfg.ConnRateTime = 1, 3*time.Second, 3*time.Second, 2*time.Second
		*profile, *linkRSS = false, false
	}

	log := slog.New(slog.DiscardHandler)
	if *verbose {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	cfg.Logger = log
	cfg.Paths = strings.Split(*paths, ",")
	if *ztEnv != "" {
		cfg.ZtunnelEnv = strings.Split(*ztEnv, ",")
	}
	if *profile {
		cfg.ProfileDir = filepath.Join(*out, "pprof")
	}
	for _, c := range strings.Split(*conns, ",") {
		var n int
		if _, err := fmt.Sscan(c, &n); err != nil || n < 1 {
			fatal(fmt.Errorf("-connections: bad count %q", c))
		}
		cfg.Connections = append(cfg.Connections, n)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, *out, *micro, *reportOnly, *linkRSS, log); err != nil {
		fatal(err)
	}
}

func run(ctx context.Context, cfg bench.Config, out, micro, reportOnly string, linkRSS bool, log *slog.Logger) error {
	var res *bench.Results
	var measureErr error
	if reportOnly != "" {
		b, err := os.ReadFile(reportOnly)
		if err != nil {
			return err
		}
		res = &bench.Results{}
		if err := json.Unmarshal(b, res); err != nil {
			return fmt.Errorf("%s: %w", reportOnly, err)
		}
	} else {
		if os.Geteuid() != 0 {
			return errors.New("needs root: network namespaces and eBPF")
		}
		if cfg.RepoDir == "" {
			dir, err := moduleRoot()
			if err != nil {
				return err
			}
			cfg.RepoDir = dir
		}
		res, measureErr = bench.Measure(ctx, cfg)
		if res == nil {
			return measureErr
		}
		if measureErr != nil {
			log.Error("measurement incomplete; writing what was measured", "err", measureErr)
		}
		if linkRSS {
			log.Info("measuring the RSS floor of ztunnel's imports")
			lr, err := bench.MeasureLinkRSS(ctx, cfg.RepoDir)
			res.LinkRSS = lr
			if err != nil {
				res.LinkRSSError = err.Error()
			}
		}
	}
	if micro != "" {
		mb, err := bench.ReadMicrobench(micro)
		if err != nil {
			return err
		}
		res.Microbench = mb
		bench.NoteControlPlane(mb)
	}
	res.Summarize()
	if err := res.WriteReport(out); err != nil {
		return err
	}
	log.Info("report written", "dir", out)
	md, _ := os.ReadFile(filepath.Join(out, "latest.md"))
	fmt.Println(string(md))
	if measureErr != nil {
		return fmt.Errorf("measurement incomplete: %w", measureErr)
	}
	return nil
}

// moduleRoot finds go.mod from the working directory up.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory; give -repo")
		}
		dir = parent
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "meshbench:", err)
	os.Exit(1)
}
