package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat
// (100 on every Linux architecture Go supports).
const clockTicks = 100

// process is a long-running program the harness started inside a network
// namespace (`ip netns exec` execs, so the PID is the program's own).
type process struct {
	Name string
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}
	err  error // set before done is closed
	// tree, if set, makes the process's CPU and memory those of it and its
	// children (nginx's master and workers): CPU summed, RSS summed (shared
	// pages counted once per process, so an upper bound).
	tree bool
}

// pids are the process's ID and, for a tree, its children's.
func (p *process) pids() []int {
	pids := []int{p.PID()}
	if !p.tree {
		return pids
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", p.PID(), p.PID()))
	if err != nil {
		return pids
	}
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			pids = append(pids, n)
		}
	}
	return pids
}

// cpu is the CPU time of the process (and, for a tree, its children).
func (p *process) cpu() (float64, error) {
	var sum float64
	for i, pid := range p.pids() {
		c, err := cpuSeconds(pid)
		if err != nil && i == 0 {
			return 0, err
		}
		sum += c
	}
	return sum, nil
}

// mem is the RSS and peak RSS of the process (and, for a tree, the sums over
// it and its children).
func (p *process) mem() (rss, hwm int64, err error) {
	for i, pid := range p.pids() {
		r, h, err := memory(pid)
		if err != nil && i == 0 {
			return 0, 0, err
		}
		rss, hwm = rss+r, hwm+h
	}
	return rss, hwm, nil
}

// niced prefixes a command line with nice(1) when niceness is not 0.
func niced(niceness int, name string, args []string) (string, []string) {
	if niceness == 0 {
		return name, args
	}
	return "nice", append([]string{"-n", strconv.Itoa(niceness), name}, args...)
}

// start runs name with args in ns at the given niceness, its output going
// to logPath.
func start(niceness int, ns *netns.NS, label, logPath, name string, args ...string) (*process, error) {
	return startEnv(niceness, nil, ns, label, logPath, name, args...)
}

// startEnv is start with extra environment variables (KEY=value).
func startEnv(niceness int, env []string, ns *netns.NS, label, logPath, name string, args ...string) (*process, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", label, err)
	}
	// Not CommandContext: processes are stopped with SIGTERM by stop, so
	// they can drain and write their last words to the log.
	name, args = niced(niceness, name, args)
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
	cmd.Stdout, cmd.Stderr = f, f
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", label, err)
	}
	p := &process{Name: label, cmd: cmd, log: f, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// PID is the process's ID.
func (p *process) PID() int { return p.cmd.Process.Pid }

// exited reports whether the process has ended, and how.
func (p *process) exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// stop sends SIGTERM, waits up to grace, then kills. Idempotent.
func (p *process) stop(grace time.Duration) {
	if p == nil {
		return
	}
	if ok, _ := p.exited(); !ok {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(grace):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	}
	p.log.Close()
}

// tail returns the last bytes of the process's log, for error messages.
func (p *process) tail() string {
	b, _ := os.ReadFile(p.log.Name())
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}

// cpuSeconds is the process's user+system CPU time so far (all threads).
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read cpu time: %w", err)
	}
	// The command name (field 2) may hold spaces; fields after it are
	// counted from the closing parenthesis. utime and stime are fields 14, 15.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("read cpu time: bad /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("read cpu time: short /proc/%d/stat", pid)
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("read cpu time: bad /proc/%d/stat", pid)
	}
	return float64(ut+st) / clockTicks, nil
}

// memory returns VmRSS and VmHWM (peak RSS) in bytes.
func memory(pid int) (rss, hwm int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, fmt.Errorf("read memory: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		fs := strings.Fields(v) // "12345 kB"
		if len(fs) != 2 {
			continue
		}
		n, err := strconv.ParseInt(fs[0], 10, 64)
		if err != nil {
			continue
		}
		if k == "VmRSS" {
			rss = n << 10
		} else {
			hwm = n << 10
		}
	}
	return rss, hwm, sc.Err()
}

// usageMeter measures the CPU time and the largest RSS of a set of
// processes over one workload run.
type usageMeter struct {
	procs []*process
	cpu0  []float64
	stopc chan struct{}
	wg    sync.WaitGroup

	mu     sync.Mutex // guards maxRSS
	maxRSS []int64
}

// ProxyUsage is what one proxy process used during one run.
type ProxyUsage struct {
	Name       string  `json:"name"`
	PID        int     `json:"pid"`
	CPUSeconds float64 `json:"cpuSeconds"`
	// MaxRSSBytes is the largest VmRSS sampled (every 100 ms) during the run.
	MaxRSSBytes int64 `json:"maxRssBytes"`
}

func meter(procs []*process) *usageMeter {
	m := &usageMeter{procs: procs, stopc: make(chan struct{}), maxRSS: make([]int64, len(procs))}
	for _, p := range procs {
		c, _ := p.cpu()
		m.cpu0 = append(m.cpu0, c)
	}
	m.sample()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-m.stopc:
				return
			case <-t.C:
				m.sample()
			}
		}
	}()
	return m
}

func (m *usageMeter) sample() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, p := range m.procs {
		if rss, _, err := p.mem(); err == nil && rss > m.maxRSS[i] {
			m.maxRSS[i] = rss
		}
	}
}

func (m *usageMeter) stop() []ProxyUsage {
	close(m.stopc)
	m.wg.Wait()
	m.sample()
	var out []ProxyUsage
	for i, p := range m.procs {
		c, _ := p.cpu()
		out = append(out, ProxyUsage{Name: p.Name, PID: p.PID(), CPUSeconds: c - m.cpu0[i], MaxRSSBytes: m.maxRSS[i]})
	}
	return out
}
