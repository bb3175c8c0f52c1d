package bench

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Microbench is the output of the Go benchmarks of the other packages
// (`go test -bench`), as make bench runs them before the mesh benchmark.
type Microbench struct {
	File     string            `json:"file"`
	Results  []MicroResult     `json:"results"`
	Failed   []string          `json:"failed,omitempty"`   // FAIL lines
	Packages []string          `json:"packages,omitempty"` // packages that ran benchmarks
	Notes    map[string]string `json:"notes,omitempty"`
}

// MicroResult is one benchmark line.
type MicroResult struct {
	Package string `json:"package"`
	Name    string `json:"name"`
	N       int64  `json:"n"`
	// Metrics by unit: "ns/op", "B/op", "allocs/op", "MB/s", "conns/s", ...
	Metrics map[string]float64 `json:"metrics"`
}

// ReadMicrobench parses `go test -bench` output.
func ReadMicrobench(path string) (*Microbench, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read micro-benchmarks: %w", err)
	}
	defer f.Close()
	mb := &Microbench{File: path}
	pkg := ""
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "pkg: "):
			pkg = strings.TrimPrefix(line, "pkg: ")
			mb.Packages = append(mb.Packages, pkg)
		case strings.HasPrefix(line, "FAIL") || strings.HasPrefix(line, "--- FAIL"):
			mb.Failed = append(mb.Failed, line)
		case strings.HasPrefix(line, "Benchmark"):
			fs := strings.Fields(line)
			if len(fs) < 4 || len(fs)%2 != 0 {
				continue
			}
			n, err := strconv.ParseInt(fs[1], 10, 64)
			if err != nil {
				continue
			}
			r := MicroResult{Package: pkg, Name: fs[0], N: n, Metrics: map[string]float64{}}
			for i := 2; i+1 < len(fs); i += 2 {
				if v, err := strconv.ParseFloat(fs[i], 64); err == nil {
					r.Metrics[fs[i+1]] = v
				}
			}
			mb.Results = append(mb.Results, r)
		}
	}
	return mb, sc.Err()
}

// NoteControlPlane records in mb whether the control-plane scale figures
// (istiod-lite's benchmarks) were part of the run.
func NoteControlPlane(mb *Microbench) {
	for _, r := range mb.Results {
		if strings.Contains(r.Package, "istiod-lite") {
			return
		}
	}
	if mb.Notes == nil {
		mb.Notes = map[string]string{}
	}
	mb.Notes["control-plane scale"] = "not measured: ./istiod-lite/... has no Go benchmark (no func Benchmark*) in this tree; " +
		"the report picks them up from the same go test -bench run once they exist"
}
