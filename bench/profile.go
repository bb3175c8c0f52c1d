package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// pprofAddr is where the profiling build of ztunnel serves net/http/pprof,
// inside each node's namespace.
const pprofAddr = "127.0.0.1:6060"

// pprofFile is added to cmd/ztunnel's main package with `go build
// -overlay`, so that the profiling build is the same ztunnel plus a pprof
// listener, without touching the ztunnel's sources.
const pprofFile = `package main

import (
	"net/http"
	_ "net/http/pprof"
)

func init() {
	go func() { _ = http.ListenAndServe("` + pprofAddr + `", nil) }()
}
`

// Profile is one pprof profile taken from a ztunnel during an extra,
// unmeasured run after the rounds.
type Profile struct {
	Node     string `json:"node"`
	Workload string `json:"workload"`
	Kind     string `json:"kind"` // cpu or heap
	File     string `json:"file"` // relative to the report directory
	// Top is `go tool pprof -top` of the profile, its first lines.
	Top string `json:"top"`
	// Breakdown is the share (percent) of the CPU samples whose leaf
	// function falls in each of profileCategories.
	Breakdown map[string]float64 `json:"breakdown,omitempty"`
}

// profileCategories sort a CPU profile's leaf functions, first match wins.
var profileCategories = []struct {
	name     string
	prefixes []string
}{
	{"syscalls", []string{"internal/runtime/syscall/linux.Syscall", "syscall.", "runtime.write1", "runtime.read", "internal/poll."}},
	{"crypto", []string{"crypto/", "vendor/golang.org/x/crypto"}},
	{"GC and allocation", []string{"runtime.gc", "runtime.scan", "runtime.mark", "runtime.malloc", "runtime.memclr", "runtime.greyobject", "runtime.findObject", "runtime.heapBits", "runtime.(*mspan)", "runtime.(*mheap)", "runtime.(*gcWork)", "runtime.wbBuf", "runtime.bulkBarrier", "runtime.sweep", "runtime.(*sweepLocked)"}},
	{"scheduler and wake-ups", []string{"runtime.futex", "runtime.usleep", "runtime.findRunnable", "runtime.schedule", "runtime.stealWork", "runtime.netpoll", "runtime.epoll", "internal/runtime/syscall/linux.EpollWait", "runtime.notesleep", "runtime.notewakeup", "runtime.runqgrab", "runtime.lock", "runtime.unlock", "runtime.park", "runtime.ready", "runtime.wakep", "runtime.casgstatus", "runtime.execute", "runtime.gopark", "runtime.goready", "runtime.mcall", "runtime.gogo", "runtime.exitsyscall", "runtime.entersyscall", "runtime.reentersyscall", "runtime.nanotime", "runtime.releasep", "runtime.acquirep", "runtime.checkTimers", "runtime.systemstack"}},
	{"memmove", []string{"runtime.memmove"}},
	{"ambit (hbone, ztunnel)", []string{"github.com/ambit-mesh/"}},
	{"HTTP/2 framing", []string{"golang.org/x/net/http2"}},
}

// breakdown sorts the flat column of a full `pprof -top` listing.
func breakdown(top string) map[string]float64 {
	out := map[string]float64{}
	inTable := false
	for _, line := range strings.Split(top, "\n") {
		fs := strings.Fields(line)
		if len(fs) >= 2 && fs[0] == "flat" && fs[1] == "flat%" {
			inTable = true
			continue
		}
		if !inTable || len(fs) < 6 {
			continue
		}
		pct, err := strconv.ParseFloat(strings.TrimSuffix(fs[1], "%"), 64)
		if err != nil || pct == 0 {
			continue
		}
		fn := fs[5]
		cat := "other"
	match:
		for _, c := range profileCategories {
			for _, p := range c.prefixes {
				if strings.HasPrefix(fn, p) {
					cat = c.name
					break match
				}
			}
		}
		out[cat] += pct
	}
	return out
}

// buildProfilingZtunnel builds cmd/ztunnel with pprofFile added.
func buildProfilingZtunnel(ctx context.Context, repoDir, dir string) (string, error) {
	src := filepath.Join(dir, "zz_bench_pprof.go")
	if err := os.WriteFile(src, []byte(pprofFile), 0o644); err != nil {
		return "", fmt.Errorf("profiling build: %w", err)
	}
	ov, _ := json.Marshal(map[string]map[string]string{"Replace": {filepath.Join(repoDir, "cmd", "ztunnel", "zz_bench_pprof.go"): src}})
	ovPath := filepath.Join(dir, "overlay.json")
	if err := os.WriteFile(ovPath, ov, 0o644); err != nil {
		return "", fmt.Errorf("profiling build: %w", err)
	}
	bin := filepath.Join(dir, "ztunnel-pprof.bin")
	cmd := goBuild(ctx, repoDir, "-overlay", ovPath, "-o", bin, "./cmd/ztunnel")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("profiling build: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return bin, nil
}

// profileRun runs one workload on p while taking a CPU profile of every
// ztunnel (and a heap profile after), and writes them into outDir.
func profileRun(ctx context.Context, cfg Config, tools *Tools, work, outDir, bin string, nodes []*netns.Node, p *path, kind string, conns int) ([]Profile, error) {
	secs := int(cfg.LatencyTime.Seconds()) - 1
	if kind == WorkThroughput {
		secs = int(cfg.ThroughputTime.Seconds())
	}
	secs = max(secs, 1)
	type got struct {
		node string
		body []byte
		err  error
	}
	var wg sync.WaitGroup
	results := make([]got, len(nodes))
	for i, n := range nodes {
		wg.Go(func() {
			code, body, err := httpGetTimeout(ctx, n.NS, fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", pprofAddr, secs), time.Duration(secs+15)*time.Second)
			if err == nil && code != http.StatusOK {
				err = fmt.Errorf("pprof: status %d: %s", code, tailString(body, 200))
			}
			results[i] = got{n.Name, []byte(body), err}
		})
	}
	time.Sleep(200 * time.Millisecond)
	r := runOne(ctx, cfg, tools, work, p, kind, conns)
	wg.Wait()
	if r.Error != "" {
		return nil, fmt.Errorf("profiling run: %s", r.Error)
	}
	label := fmt.Sprintf("%s-c%d", kind, conns)
	var out []Profile
	for _, g := range results {
		if g.err != nil {
			return out, fmt.Errorf("cpu profile of %s: %w", g.node, g.err)
		}
		prof, err := saveProfile(ctx, outDir, bin, g.node, label, "cpu", g.body)
		if err != nil {
			return out, err
		}
		out = append(out, prof)
	}
	if kind == WorkLatency {
		for _, n := range nodes {
			code, body, err := httpGet(ctx, n.NS, "http://"+pprofAddr+"/debug/pprof/heap")
			if err == nil && code != http.StatusOK {
				err = fmt.Errorf("pprof: status %d", code)
			}
			if err != nil {
				return out, fmt.Errorf("heap profile of %s: %w", n.Name, err)
			}
			prof, err := saveProfile(ctx, outDir, bin, n.Name, label, "heap", []byte(body))
			if err != nil {
				return out, err
			}
			out = append(out, prof)
		}
	}
	return out, nil
}

func saveProfile(ctx context.Context, outDir, bin, node, label, kind string, body []byte) (Profile, error) {
	name := fmt.Sprintf("ztunnel-%s-%s.%s.pprof", node, label, kind)
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return Profile{}, fmt.Errorf("save profile: %w", err)
	}
	file := filepath.Join(outDir, name)
	if err := os.WriteFile(file, body, 0o644); err != nil {
		return Profile{}, fmt.Errorf("save profile: %w", err)
	}
	args := []string{"tool", "pprof", "-top", "-nodecount=500"}
	if kind == "heap" {
		args = append(args, "-sample_index=inuse_space")
	}
	top, err := exec.CommandContext(ctx, "go", append(args, bin, file)...).Output()
	if err != nil {
		return Profile{}, fmt.Errorf("pprof -top %s: %w", name, err)
	}
	lines := strings.Split(strings.TrimSpace(string(top)), "\n")
	p := Profile{Node: node, Workload: label, Kind: kind, File: filepath.Join(filepath.Base(outDir), name),
		Top: strings.Join(lines[:min(len(lines), 28)], "\n")}
	if kind == "cpu" {
		p.Breakdown = breakdown(string(top))
	}
	return p, nil
}
