package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// LinkRSS is the resident memory of an idle program that does nothing but
// link a set of packages (their init functions run, their pages load): the
// floor under the RSS of any binary that imports them.
type LinkRSS struct {
	Name        string   `json:"name"`
	Packages    []string `json:"packages"`
	BinaryBytes int64    `json:"binaryBytes"`
	RSSBytes    int64    `json:"rssBytes"`
}

// linkSets are cumulative: each adds packages to the previous one, in the
// order cmd/ztunnel's imports pull them in.
var linkSets = []struct {
	name string
	pkgs []string
}{
	{"empty Go program", nil},
	{"+ data path (ztunnel, hbone, bpf, certs, configfile)", []string{"ztunnel", "hbone", "bpf", "certs", "ztunnel/configfile"}},
	{"+ model, authz, xdsclient (gRPC, xDS protos)", []string{"model", "authz", "xdsclient"}},
	{"+ certs/caclient: everything cmd/ztunnel imports", []string{"certs/caclient"}},
}

// MeasureLinkRSS builds and runs one idle program per linkSets entry from
// the module at repoDir and reports their RSS after a second.
func MeasureLinkRSS(ctx context.Context, repoDir string) ([]LinkRSS, error) {
	dir, err := os.MkdirTemp("", "ambit-linkrss-")
	if err != nil {
		return nil, fmt.Errorf("link rss: %w", err)
	}
	defer os.RemoveAll(dir)
	var out []LinkRSS
	var pkgs []string
	for i, s := range linkSets {
		for _, p := range s.pkgs {
			pkgs = append(pkgs, "github.com/ambit-mesh/ambit/"+p)
		}
		var imports strings.Builder
		for _, p := range pkgs {
			fmt.Fprintf(&imports, "\t_ %q\n", p)
		}
		src := filepath.Join(dir, fmt.Sprintf("p%d", i), "main.go")
		if err := os.MkdirAll(filepath.Dir(src), 0o755); err != nil {
			return nil, fmt.Errorf("link rss: %w", err)
		}
		prog := "package main\n\nimport (\n\t\"fmt\"\n\t\"os\"\n\t\"time\"\n\n" + imports.String() + ")\n\n" +
			"func main() {\n\ttime.Sleep(time.Second)\n\tb, _ := os.ReadFile(\"/proc/self/status\")\n\tfmt.Print(string(b))\n}\n"
		if err := os.WriteFile(src, []byte(prog), 0o644); err != nil {
			return nil, fmt.Errorf("link rss: %w", err)
		}
		bin := filepath.Join(dir, fmt.Sprintf("p%d.bin", i))
		if b, err := goBuild(ctx, repoDir, "-o", bin, src).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("link rss: build %s: %w: %s", s.name, err, strings.TrimSpace(string(b)))
		}
		st, err := os.Stat(bin)
		if err != nil {
			return nil, fmt.Errorf("link rss: %w", err)
		}
		status, err := exec.CommandContext(ctx, bin).Output()
		if err != nil {
			return nil, fmt.Errorf("link rss: run %s: %w", s.name, err)
		}
		r := LinkRSS{Name: s.name, Packages: append([]string(nil), pkgs...), BinaryBytes: st.Size()}
		for _, line := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				var kb int64
				fmt.Sscan(strings.TrimSpace(v), &kb)
				r.RSSBytes = kb << 10
			}
		}
		out = append(out, r)
	}
	return out, nil
}
