// Package images builds ambit's OCI container images without a container
// engine, the way ko does, with go-containerregistry: static Go binaries
// (CGO_ENABLED=0, -trimpath, -tags grpcnotrace) on an empty base plus a
// layer with /etc/passwd and /etc/group (root and nonroot, uid 65532) and a
// writable /tmp, labelled with org.opencontainers.image.{version,source,revision}. Each image is
// written as an OCI image layout directory and as a tarball that
// `docker load` reads.
//
// Two kinds of image come out of one build:
//
//   - the combined image Hub/ambit:Tag, holding /istiod-lite, /ztunnel and
//     /waypoint, which manifests/ (each container's command names its binary)
//     and istiod-lite's waypoint deployer (deployer.DefaultImage, command
//     /waypoint) reference today; `ambitctl install --hub Hub --tag Tag`
//     selects it. It has no entrypoint: its users give the command.
//   - one image per component, Hub/ambit/NAME:Tag, whose entrypoint is
//     /NAME, for running a component alone (docker run, other manifests).
//
// Users: istiod-lite, waypoint and the combined image run as 65532:65532.
// ztunnel's image runs as root (0:0): it attaches eBPF programs and sets
// routes in the node's network namespace, which needs NET_ADMIN, BPF and
// PERFMON as effective capabilities, and Kubernetes grants added
// capabilities effectively only to uid 0. manifests/ztunnel.yaml sets
// runAsUser: 0 for the same reason, overriding the combined image's user.
package images

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Defaults of Builder.
const (
	DefaultHub    = "ghcr.io/ambit-mesh"
	DefaultTag    = "latest"
	DefaultSource = "https://github.com/ambit-mesh/ambit"
	// Combined is the repository name (under Hub) of the image with every
	// binary, the one the manifests name.
	Combined = "ambit"
	// NonRoot is the uid and gid of the user "nonroot".
	NonRoot = 65532
)

// The OCI annotation keys of the labels every image carries.
const (
	LabelVersion  = "org.opencontainers.image.version"
	LabelSource   = "org.opencontainers.image.source"
	LabelRevision = "org.opencontainers.image.revision"
)

// Component is one of ambit's programs.
type Component struct {
	// Name is the binary's name, its path in the image (/Name) and its
	// image's last path element.
	Name string
	// Package is the Go package of its main, relative to the module root.
	Package string
	// User is the image's user ("uid:gid").
	User string
}

// Components are the programs that get images.
var Components = []Component{
	{Name: "istiod-lite", Package: "./cmd/istiod-lite", User: "65532:65532"},
	{Name: "ztunnel", Package: "./cmd/ztunnel", User: "0:0"},
	{Name: "waypoint", Package: "./cmd/waypoint", User: "65532:65532"},
}

// Builder builds the images. The zero value builds into bin/images from the
// module in the working directory.
type Builder struct {
	// ModuleDir is where `go build` runs (default: the working directory).
	ModuleDir string
	// Out is the output directory (default "bin/images"); each image is
	// written as Out/NAME (an OCI layout) and Out/NAME.tar (docker load).
	Out string
	// Hub is the registry and path before the image names (default DefaultHub).
	Hub string
	// Tag is the images' tag (default DefaultTag).
	Tag string
	// Version, Source and Revision are the labels' values (defaults: Tag,
	// DefaultSource, and `git rev-parse HEAD` in ModuleDir or "unknown").
	Version, Source, Revision string
	// GOARCH is the binaries' and images' architecture (default: this
	// machine's). The OS is always linux.
	GOARCH string
	// Created is the images' creation time (default: the Unix epoch, so
	// that identical inputs give identical digests).
	Created time.Time
	// Go is the go command (default "go").
	Go string
	// Log receives progress (nil: discarded).
	Log *slog.Logger
}

// Image is one built image.
type Image struct {
	// Ref is its name, "Hub/NAME:Tag".
	Ref string
	// Layout is its OCI image layout directory; Tarball its docker-load file.
	Layout, Tarball string
	// Digest is its manifest's digest.
	Digest v1.Hash
	// Image is the image itself.
	Image v1.Image
}

func (b *Builder) defaults() Builder {
	c := *b
	if c.Out == "" {
		c.Out = filepath.Join("bin", "images")
	}
	if c.Hub == "" {
		c.Hub = DefaultHub
	}
	c.Hub = strings.TrimSuffix(c.Hub, "/")
	if c.Tag == "" {
		c.Tag = DefaultTag
	}
	if c.Version == "" {
		c.Version = c.Tag
	}
	if c.Source == "" {
		c.Source = DefaultSource
	}
	if c.Go == "" {
		c.Go = "go"
	}
	if c.GOARCH == "" {
		c.GOARCH = runtime.GOARCH
	}
	if c.Created.IsZero() {
		c.Created = time.Unix(0, 0).UTC()
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	return c
}

// Ref returns the reference of the image of component name ("" for the
// combined image).
func (b *Builder) Ref(component string) string {
	c := b.defaults()
	if component == "" || component == Combined {
		return c.Hub + "/" + Combined + ":" + c.Tag
	}
	return c.Hub + "/" + Combined + "/" + component + ":" + c.Tag
}

// Build compiles the components and writes the combined image and one image
// per component. It returns the images, the combined one first.
func (b *Builder) Build(ctx context.Context) ([]Image, error) {
	c := b.defaults()
	if c.Revision == "" {
		cmd := exec.CommandContext(ctx, "git", "rev-parse", "HEAD")
		cmd.Dir = c.ModuleDir
		if out, err := cmd.Output(); err == nil {
			c.Revision = strings.TrimSpace(string(out))
		}
	}
	if c.Revision == "" {
		c.Revision = "unknown"
	}
	if err := os.MkdirAll(c.Out, 0o755); err != nil {
		return nil, fmt.Errorf("images: %w", err)
	}
	binDir, err := os.MkdirTemp("", "ambit-images-")
	if err != nil {
		return nil, fmt.Errorf("images: %w", err)
	}
	defer os.RemoveAll(binDir)

	if err := c.compile(ctx, binDir); err != nil {
		return nil, err
	}
	base, err := baseLayer(c.Created)
	if err != nil {
		return nil, err
	}
	bins := map[string]v1.Layer{}
	for _, comp := range Components {
		l, err := binaryLayer(filepath.Join(binDir, comp.Name), "/"+comp.Name, c.Created)
		if err != nil {
			return nil, err
		}
		bins[comp.Name] = l
	}

	type spec struct {
		name       string
		user       string
		entrypoint []string
		layers     []v1.Layer
	}
	all := spec{name: Combined, user: fmt.Sprintf("%d:%d", NonRoot, NonRoot), layers: []v1.Layer{base}}
	var specs []spec
	for _, comp := range Components {
		all.layers = append(all.layers, bins[comp.Name])
		specs = append(specs, spec{
			name:       comp.Name,
			user:       comp.User,
			entrypoint: []string{"/" + comp.Name},
			layers:     []v1.Layer{base, bins[comp.Name]},
		})
	}
	specs = append([]spec{all}, specs...)

	var out []Image
	for _, s := range specs {
		img, err := c.image(s.layers, s.user, s.entrypoint)
		if err != nil {
			return nil, fmt.Errorf("images: %s: %w", s.name, err)
		}
		ref := c.Ref(s.name)
		im, err := c.write(ref, s.name, img)
		if err != nil {
			return nil, fmt.Errorf("images: %s: %w", ref, err)
		}
		c.Log.Info("image written", "ref", ref, "digest", im.Digest.String(), "layout", im.Layout, "tarball", im.Tarball)
		out = append(out, im)
	}
	return out, nil
}

// compile builds every component's static binary into dir.
func (c *Builder) compile(ctx context.Context, dir string) error {
	// grpcnotrace: gRPC without golang.org/x/net/trace, whose
	// html/template turns off the linker's dead-method elimination (about
	// 5 MB of ztunnel's text and read-only data, 3 MB of its RSS); the
	// Makefile's BUILD_TAGS.
	args := []string{"build", "-trimpath", "-tags=grpcnotrace", "-o", dir + string(filepath.Separator)}
	for _, comp := range Components {
		args = append(args, comp.Package)
	}
	cmd := exec.CommandContext(ctx, c.Go, args...)
	cmd.Dir = c.ModuleDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+c.GOARCH)
	c.Log.Info("compiling", "cmd", c.Go+" "+strings.Join(args, " "), "GOARCH", c.GOARCH)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("images: go build: %w\n%s", err, out)
	}
	return nil
}

// image assembles one image on the empty base.
func (c *Builder) image(layers []v1.Layer, user string, entrypoint []string) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err := mutate.AppendLayers(img, layers...)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS = "linux"
	cf.Architecture = c.GOARCH
	cf.Created = v1.Time{Time: c.Created}
	cf.Author = "ambit"
	cf.Config = v1.Config{
		User:       user,
		Entrypoint: entrypoint,
		WorkingDir: "/",
		Env:        []string{"PATH=/"},
		Labels: map[string]string{
			LabelVersion:  c.Version,
			LabelSource:   c.Source,
			LabelRevision: c.Revision,
		},
	}
	// history entries are needed by some tools (docker history) and must
	// match the layers one to one
	cf.History = nil
	for range layers {
		cf.History = append(cf.History, v1.History{Created: v1.Time{Time: c.Created}, CreatedBy: "ambit make images"})
	}
	return mutate.ConfigFile(img, cf)
}

// write writes img as Out/file (OCI layout) and Out/file.tar (docker load).
func (c *Builder) write(ref, file string, img v1.Image) (Image, error) {
	tag, err := name.NewTag(ref, name.StrictValidation)
	if err != nil {
		return Image{}, err
	}
	digest, err := img.Digest()
	if err != nil {
		return Image{}, err
	}
	dir := filepath.Join(c.Out, file)
	if err := os.RemoveAll(dir); err != nil {
		return Image{}, err
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return Image{}, err
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": tag.TagStr(),
		"io.containerd.image.name":          tag.Name(),
	})); err != nil {
		return Image{}, err
	}
	tb := filepath.Join(c.Out, file+".tar")
	if err := tarball.WriteToFile(tb, tag, img); err != nil {
		return Image{}, err
	}
	return Image{Ref: tag.Name(), Layout: dir, Tarball: tb, Digest: digest, Image: img}, nil
}

// passwd and group name root and nonroot (65532), as distroless does.
var (
	passwd = fmt.Sprintf("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%d:%d:nonroot:/home/nonroot:/sbin/nologin\n", NonRoot, NonRoot)
	group  = fmt.Sprintf("root:x:0:\nnonroot:x:%d:\n", NonRoot)
)

// baseLayer holds /etc/passwd, /etc/group, /tmp and the homes.
func baseLayer(mtime time.Time) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := []struct {
		name     string
		mode     int64
		uid, gid int
	}{
		{"etc/", 0o755, 0, 0},
		{"root/", 0o700, 0, 0},
		{"home/", 0o755, 0, 0},
		{"home/nonroot/", 0o700, NonRoot, NonRoot},
		{"tmp/", 0o1777, 0, 0},
	}
	for _, d := range dirs {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d.name, Mode: d.mode, Uid: d.uid, Gid: d.gid, ModTime: mtime, Format: tar.FormatPAX}); err != nil {
			return nil, fmt.Errorf("images: base layer: %w", err)
		}
	}
	for _, f := range []struct{ name, body string }{{"etc/passwd", passwd}, {"etc/group", group}} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: 0o644, Size: int64(len(f.body)), ModTime: mtime, Format: tar.FormatPAX}); err != nil {
			return nil, fmt.Errorf("images: base layer: %w", err)
		}
		if _, err := io.WriteString(tw, f.body); err != nil {
			return nil, fmt.Errorf("images: base layer: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("images: base layer: %w", err)
	}
	return layerOf(buf.Bytes())
}

// binaryLayer holds the file src at path dst (absolute), mode 0755.
func binaryLayer(src, dst string, mtime time.Time) (v1.Layer, error) {
	b, err := os.ReadFile(src)
	if err != nil {
		return nil, fmt.Errorf("images: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(dst, "/"), Mode: 0o755, Size: int64(len(b)), ModTime: mtime, Format: tar.FormatPAX}); err != nil {
		return nil, fmt.Errorf("images: %s layer: %w", dst, err)
	}
	if _, err := tw.Write(b); err != nil {
		return nil, fmt.Errorf("images: %s layer: %w", dst, err)
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("images: %s layer: %w", dst, err)
	}
	return layerOf(buf.Bytes())
}

func layerOf(b []byte) (v1.Layer, error) {
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, fmt.Errorf("images: layer: %w", err)
	}
	return l, nil
}
