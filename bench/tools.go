package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// FortioVersion is the fortio release the harness builds. Later releases
// import grol.io/grol, which the module proxy here refuses to serve.
const FortioVersion = "v1.66.5"

// BuildTags are the build tags of the binaries the harness builds from
// the module, the same as the Makefile's build and ambitctl/images use:
// what is measured is what ships. grpcnotrace leaves out gRPC's
// golang.org/x/net/trace, whose html/template calls
// reflect.Value.MethodByName with a computed name: while that is linked,
// the linker keeps every exported method of every type that can be
// reached at run time (all the protobuf messages' getters and validators),
// about 5 MB of ztunnel's text and read-only data and 3 MB of its RSS
// (issue 18).
const BuildTags = "grpcnotrace"

// goBuild is `go build args...` in the module at dir as the binaries ship:
// static (CGO_ENABLED=0: nothing in ambit needs cgo, and a static binary
// maps no libc or ld.so), with BuildTags, -trimpath.
func goBuild(ctx context.Context, dir string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "go", append([]string{"build", "-trimpath", "-tags=" + BuildTags}, args...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	return cmd
}

// Tools are the external programs a run uses, with their versions.
type Tools struct {
	Fortio, Iperf3, HAProxy, Ztunnel string
	// Nginx is Debian's nginx, for the nginx path (NginxErr says why not).
	Nginx    string
	NginxErr error
	// Versions of each tool, for the report.
	Versions map[string]string
	// ZtunnelErr says why the ztunnel binary could not be built (the ambit
	// path is then reported as not measured).
	ZtunnelErr error
}

// CacheDir is where built tools are kept between runs:
// $AMBIT_CACHE, else ~/.cache/ambit.
func CacheDir() string {
	if d := os.Getenv("AMBIT_CACHE"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "ambit-cache")
	}
	return filepath.Join(home, ".cache", "ambit")
}

// findTools locates iperf3 and haproxy, builds (or reuses) fortio, and
// builds ztunnel from the module at repoDir into workDir.
func findTools(ctx context.Context, repoDir, cacheDir, workDir string, log *slog.Logger) (*Tools, error) {
	t := &Tools{Versions: map[string]string{}}
	var err error
	if t.Iperf3, err = exec.LookPath("iperf3"); err != nil {
		return nil, fmt.Errorf("iperf3 not found (scripts/install-deps.sh bench): %w", err)
	}
	if t.HAProxy, err = exec.LookPath("haproxy"); err != nil {
		if t.HAProxy, err = exec.LookPath("/usr/sbin/haproxy"); err != nil {
			return nil, fmt.Errorf("haproxy not found (scripts/install-deps.sh bench): %w", err)
		}
	}
	if t.Nginx, err = exec.LookPath("nginx"); err != nil {
		if t.Nginx, err = exec.LookPath("/usr/sbin/nginx"); err != nil {
			t.NginxErr = fmt.Errorf("nginx not found (scripts/install-deps.sh bench): %w", err)
		}
	}
	if t.NginxErr == nil {
		t.Versions["nginx"] = firstLine(exec.CommandContext(ctx, t.Nginx, "-v").CombinedOutput())
	}
	t.Versions["iperf3"] = firstLine(exec.CommandContext(ctx, t.Iperf3, "--version").CombinedOutput())
	t.Versions["haproxy"] = firstLine(exec.CommandContext(ctx, t.HAProxy, "-v").CombinedOutput())
	if t.Fortio, err = buildFortio(ctx, cacheDir, log); err != nil {
		return nil, err
	}
	t.Versions["fortio"] = FortioVersion
	t.Ztunnel = filepath.Join(workDir, "ztunnel.bin")
	log.Info("building ztunnel", "module", repoDir)
	cmd := goBuild(ctx, repoDir, "-o", t.Ztunnel, "./cmd/ztunnel")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.ZtunnelErr = fmt.Errorf("go build ./cmd/ztunnel: %w: %s", err, strings.TrimSpace(string(out)))
		t.Ztunnel = ""
	} else {
		rev := exec.CommandContext(ctx, "git", "describe", "--always", "--dirty")
		rev.Dir = repoDir
		t.Versions["ztunnel"] = "built from " + firstLine(rev.Output())
	}
	t.Versions["go"] = firstLine(exec.CommandContext(ctx, "go", "version").Output())
	return t, nil
}

// buildFortio returns the cached fortio binary, building it first if
// needed: a throw-away wrapper module requires fortio.org/fortio at
// FortioVersion and `go build`s its main package (`go install mod@version`
// can fail here when the proxy refuses a version list).
func buildFortio(ctx context.Context, cacheDir string, log *slog.Logger) (string, error) {
	dir := filepath.Join(cacheDir, "fortio-"+FortioVersion)
	bin := filepath.Join(dir, "fortio")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("fortio cache: %w", err)
	}
	src, err := os.MkdirTemp("", "fortio-wrap-")
	if err != nil {
		return "", fmt.Errorf("fortio wrapper: %w", err)
	}
	defer os.RemoveAll(src)
	if err := os.WriteFile(filepath.Join(src, "go.mod"), []byte("module ambit.local/fortiowrap\n\ngo 1.26\n"), 0o644); err != nil {
		return "", fmt.Errorf("fortio wrapper: %w", err)
	}
	log.Info("building fortio from the module proxy", "version", FortioVersion)
	for _, args := range [][]string{
		{"get", "fortio.org/fortio@" + FortioVersion},
		{"build", "-o", bin + ".tmp", "fortio.org/fortio"},
	} {
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = src
		cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("build fortio: go %s: %w: %s", args[0], err, strings.TrimSpace(string(out)))
		}
	}
	if err := os.Rename(bin+".tmp", bin); err != nil {
		return "", fmt.Errorf("build fortio: %w", err)
	}
	return bin, nil
}

func firstLine(b []byte, err error) string {
	if err != nil && len(b) == 0 {
		return "unknown (" + err.Error() + ")"
	}
	s, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return s
}

// errNotMeasured marks a path that could not be measured; its message is the
// reason the report prints.
var errNotMeasured = errors.New("not measured")
