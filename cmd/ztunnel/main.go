// Command ztunnel is ambit's per-node L4 proxy: it captures enrolled workloads'
// TCP connections and carries them in mutual-TLS HBONE tunnels.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	fs := flag.NewFlagSet("ztunnel", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `ztunnel: ambit's per-node L4 proxy.

It listens on 15001 (outbound capture), 15006 (inbound plaintext capture),
15008 (HBONE), 15080 (SOCKS5), 15000 (admin, localhost), 15020 (metrics) and
15021 (readiness), holds one SPIFFE certificate per local workload and carries
enrolled workloads' TCP in mutual-TLS HTTP/2 CONNECT tunnels.

Usage: ztunnel [flags]

`)
		fs.PrintDefaults()
	}
	_ = fs.Parse(os.Args[1:])
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "ztunnel:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	_ = ctx
	return errors.New("the proxy is not built yet (issue: ztunnel)")
}
