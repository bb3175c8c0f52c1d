// Command ambit-images builds ambit's OCI images without a container engine
// (make images): see package github.com/ambit-mesh/ambit/ambitctl/images.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/ambit-mesh/ambit/ambitctl/images"
)

func main() {
	var b images.Builder
	flag.StringVar(&b.Out, "out", "bin/images", "output directory: NAME/ (OCI layout) and NAME.tar (docker load) per image")
	flag.StringVar(&b.Hub, "hub", images.DefaultHub, "registry and path before the image names (as ambitctl install --hub)")
	flag.StringVar(&b.Tag, "tag", images.DefaultTag, "image tag (as ambitctl install --tag)")
	flag.StringVar(&b.Version, "version", "", "org.opencontainers.image.version label (default: the tag)")
	flag.StringVar(&b.Revision, "revision", "", "org.opencontainers.image.revision label (default: git rev-parse HEAD)")
	flag.StringVar(&b.Source, "source", images.DefaultSource, "org.opencontainers.image.source label")
	flag.StringVar(&b.GOARCH, "arch", "", "architecture of binaries and images (default: this machine's)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: ambit-images [flags]\n\nexample:\n  go run ./cmd/ambit-images -hub registry.example.com/mesh -tag 0.3.0\n  docker load -i bin/images/ambit.tar\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	b.Log = slog.New(slog.NewTextHandler(os.Stderr, nil))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	imgs, err := b.Build(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "ambit-images:", err)
		os.Exit(1)
	}
	for _, im := range imgs {
		fmt.Printf("%s\t%s\t%s\n", im.Ref, im.Digest, im.Tarball)
	}
}
