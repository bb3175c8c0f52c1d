// The race detector adds nothing to a test of image contents and makes its
// gzip and SHA-256 passes over ~100 MB of binaries take minutes: make test
// runs this file without -race (a second go test line).

//go:build !race

package ambitctl_test

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"errors"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/ambit-mesh/ambit/ambitctl/images"
	"github.com/ambit-mesh/ambit/istiod-lite/deployer"
)

// waypointCommand is the deployer's default container command for
// waypoints (istiod-lite/deployer's defaultCommand, unexported).
const waypointCommand = "/waypoint"

// TestImageNamesMatchManifests: without building, the default images are
// the names the manifests and the waypoint deployer use.
func TestImageNamesMatchManifests(t *testing.T) {
	var b images.Builder
	if got := b.Ref(""); got != deployer.DefaultImage {
		t.Errorf("combined image %s, deployer.DefaultImage %s", got, deployer.DefaultImage)
	}
	for _, c := range containers(t, decodeStream(t, mustRun(t, "", "install", "--dry-run").stdout)) {
		if c.image != b.Ref("") {
			t.Errorf("%s: image %s, make images builds %s", c.where, c.image, b.Ref(""))
		}
	}
}

// TestImages builds the images into a temporary directory (go build of the
// three components) and checks them against the manifests
// (ambitctl install --dry-run --hub --tag) and the waypoint deployer.
func TestImages(t *testing.T) {
	if testing.Short() {
		t.Skip("builds istiod-lite, ztunnel and waypoint (-short)")
	}
	const hub, tag = "registry.test/mesh", "t1"
	b := images.Builder{ModuleDir: "..", Out: t.TempDir(), Hub: hub, Tag: tag, Version: "1.2.3", Revision: "0123abcd"}
	built, err := b.Build(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	byRef := map[string]images.Image{}
	for _, im := range built {
		byRef[im.Ref] = im
	}
	if len(byRef) != 4 {
		t.Fatalf("built %d images, want 4 (combined + 3)", len(byRef))
	}

	files := map[string]map[string]extracted{} // by ref, by absolute path
	for ref, im := range byRef {
		t.Run(ref, func(t *testing.T) {
			// the docker-load tarball: its RepoTags name ref and it holds
			// the same config
			tg, err := name.NewTag(ref)
			if err != nil {
				t.Fatal(err)
			}
			m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(im.Tarball) })
			if err != nil {
				t.Fatal(err)
			}
			if len(m) != 1 || !slices.Equal(m[0].RepoTags, []string{ref}) {
				t.Errorf("docker tarball manifest %+v, want RepoTags [%s]", m, ref)
			}
			fromTar, err := tarball.ImageFromPath(im.Tarball, &tg)
			if err != nil {
				t.Fatal(err)
			}
			// the OCI layout: one manifest, annotated with the tag, the
			// image's digest
			idx, err := layout.ImageIndexFromPath(im.Layout)
			if err != nil {
				t.Fatal(err)
			}
			im2, err := idx.IndexManifest()
			if err != nil {
				t.Fatal(err)
			}
			if len(im2.Manifests) != 1 || im2.Manifests[0].Digest != im.Digest || im2.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != tag {
				t.Errorf("OCI layout index %+v, want one manifest %s tagged %s", im2.Manifests, im.Digest, tag)
			}
			fromLayout, err := idx.Image(im.Digest)
			if err != nil {
				t.Fatal(err)
			}
			// digests, sizes and diff IDs consistent, as a registry or
			// docker load checks them
			if err := validate.Image(fromLayout); err != nil {
				t.Errorf("OCI layout image invalid: %v", err)
			}
			if err := validate.Image(fromTar); err != nil {
				t.Errorf("docker tarball image invalid: %v", err)
			}
			c1, _ := fromTar.ConfigName()
			c2, _ := fromLayout.ConfigName()
			if c1 != c2 {
				t.Errorf("tarball config %s, layout config %s", c1, c2)
			}
			cf, err := fromLayout.ConfigFile()
			if err != nil {
				t.Fatal(err)
			}
			if cf.OS != "linux" || cf.Config.Labels["org.opencontainers.image.version"] != "1.2.3" ||
				cf.Config.Labels["org.opencontainers.image.revision"] != "0123abcd" ||
				cf.Config.Labels["org.opencontainers.image.source"] != "https://github.com/ambit-mesh/ambit" {
				t.Errorf("config: os %s labels %v", cf.OS, cf.Config.Labels)
			}
			fs := extract(t, fromLayout)
			files[ref] = fs
			if !strings.Contains(string(fs["/etc/passwd"].body), "nonroot:x:65532:65532:") {
				t.Errorf("/etc/passwd: %q", fs["/etc/passwd"].body)
			}
			if h := fs["/tmp"].hdr; h == nil || h.Mode&0o1777 != 0o1777 {
				t.Errorf("/tmp missing or not world-writable: %+v", h)
			}

			// a component's image: entrypoint /NAME, a static binary there,
			// its user
			comp := strings.TrimPrefix(strings.TrimSuffix(ref, ":"+tag), hub+"/ambit/")
			for _, c := range images.Components {
				if c.Name != comp {
					continue
				}
				if !slices.Equal(cf.Config.Entrypoint, []string{"/" + c.Name}) {
					t.Errorf("entrypoint %v", cf.Config.Entrypoint)
				}
				want := "65532:65532"
				if c.Name == "ztunnel" {
					want = "0:0" // NET_ADMIN, BPF, PERFMON need uid 0 in Kubernetes
				}
				if cf.Config.User != want {
					t.Errorf("user %q, want %q", cf.Config.User, want)
				}
				checkStatic(t, fs, "/"+c.Name)
			}
		})
	}

	// every container of the installation runs a binary its image has, as
	// a user it knows; the installation names only built images
	objs := decodeStream(t, mustRun(t, "", "install", "--dry-run", "--hub", hub, "--tag", tag).stdout)
	cs := containers(t, objs)
	cs = append(cs, container{where: "waypoint Deployment (istiod-lite/deployer)", image: hub + "/ambit:" + tag,
		command: []string{waypointCommand}, uid: 65532, uidSet: true, nonRoot: true})
	if len(cs) < 3 {
		t.Fatalf("found %d containers, want istiod-lite, ztunnel and the waypoint", len(cs))
	}
	for _, c := range cs {
		fs, ok := files[c.image]
		if !ok {
			t.Errorf("%s: image %s is not built by make images (built: %v)", c.where, c.image, slices.Sorted(maps.Keys(byRef)))
			continue
		}
		if len(c.command) == 0 {
			t.Errorf("%s: no command, and the combined image has no entrypoint", c.where)
			continue
		}
		if e, ok := fs[c.command[0]]; !ok || e.hdr.Mode&0o111 == 0 {
			t.Errorf("%s: command %s is not an executable in %s", c.where, c.command[0], c.image)
		} else {
			checkStatic(t, fs, c.command[0])
		}
		uid := 65532 // the combined image's user
		if c.uidSet {
			uid = c.uid
		}
		if c.nonRoot && uid == 0 {
			t.Errorf("%s: runAsNonRoot with uid 0", c.where)
		}
		if !strings.Contains(string(fs["/etc/passwd"].body), ":x:"+strconv.Itoa(uid)+":") {
			t.Errorf("%s: uid %d has no /etc/passwd entry in %s", c.where, uid, c.image)
		}
	}
}

type extracted struct {
	hdr  *tar.Header
	body []byte
}

// extract reads the image's flattened filesystem.
func extract(t *testing.T, img v1.Image) map[string]extracted {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	out := map[string]extracted{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out["/"+strings.Trim(h.Name, "/")] = extracted{h, b}
	}
}

// checkStatic: path is a static Linux ELF executable (no interpreter, so
// it runs on the empty base).
func checkStatic(t *testing.T, fs map[string]extracted, path string) {
	t.Helper()
	e, ok := fs[path]
	if !ok {
		t.Errorf("%s missing", path)
		return
	}
	if e.hdr.Mode&0o111 == 0 {
		t.Errorf("%s mode %o: not executable", path, e.hdr.Mode)
	}
	f, err := elf.NewFile(bytes.NewReader(e.body))
	if err != nil {
		t.Errorf("%s: not ELF: %v", path, err)
		return
	}
	if f.Type != elf.ET_EXEC {
		t.Errorf("%s: ELF type %v, want a static executable", path, f.Type)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("%s: dynamically linked (PT_INTERP): CGO_ENABLED=0 lost", path)
		}
	}
}

type container struct {
	where   string
	image   string
	command []string
	uid     int
	uidSet  bool
	nonRoot bool
}

// containers lists the containers of the Deployments and DaemonSets of
// objs, with their effective runAsUser and runAsNonRoot.
func containers(t *testing.T, objs []*unstructured.Unstructured) []container {
	t.Helper()
	var out []container
	for _, o := range objs {
		if o.GetKind() != "Deployment" && o.GetKind() != "DaemonSet" {
			continue
		}
		spec, _, _ := unstructured.NestedMap(o.Object, "spec", "template", "spec")
		podUID, podUIDSet, _ := unstructured.NestedInt64(spec, "securityContext", "runAsUser")
		podNonRoot, _, _ := unstructured.NestedBool(spec, "securityContext", "runAsNonRoot")
		cs, _, _ := unstructured.NestedSlice(spec, "containers")
		for _, c := range cs {
			cm := c.(map[string]any)
			ct := container{where: o.GetKind() + " " + o.GetName() + " container " + cm["name"].(string), nonRoot: podNonRoot}
			ct.image, _ = cm["image"].(string)
			ct.command, _, _ = unstructured.NestedStringSlice(cm, "command")
			ct.uid, ct.uidSet = int(podUID), podUIDSet
			if u, ok, _ := unstructured.NestedInt64(cm, "securityContext", "runAsUser"); ok {
				ct.uid, ct.uidSet = int(u), true
			}
			if nr, ok, _ := unstructured.NestedBool(cm, "securityContext", "runAsNonRoot"); ok {
				ct.nonRoot = nr
			}
			out = append(out, ct)
		}
	}
	return out
}
