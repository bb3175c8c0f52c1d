// Command ambitctl installs and operates ambit, in the manner of istioctl.
// The commands live in package github.com/ambit-mesh/ambit/ambitctl.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/ambit-mesh/ambit/ambitctl"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := ambitctl.Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
