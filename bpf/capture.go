package bpf

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Options configure a Capture. The zero value captures in the calling
// process's network namespace with the default ports.
type Options struct {
	// PinPath is the bpffs directory for the pinned maps and links, one per
	// node (network namespace). Default: /sys/fs/bpf/ambit.
	PinPath string
	// Netns is the path of the node's network namespace (for example
	// /var/run/netns/node1). Empty: the calling process's.
	Netns string
	// Uplinks are the interfaces on which traffic from other nodes arrives;
	// they get the inbound program. Empty: the interface of the default
	// route, if any. Without it, inbound capture still happens, on the pods'
	// veths, at the cost of one more pass through the node's stack.
	Uplinks []string
	// Ports of ztunnel's listeners. Defaults: 15001, 15006, 15008.
	OutboundPort, InboundPort, HBONEPort uint16
	// Mark is the packet mark of captured packets and RouteTable the table
	// of the local route they take. LoopMark marks the packets that the
	// programs loop back from a pod veth's egress to its ingress. Defaults:
	// 0x100, 100 and 0x200.
	Mark       uint32
	RouteTable int
	LoopMark   uint32
	// BypassMark is the socket mark (SO_MARK) of ztunnel's own sockets:
	// the node's packets that carry it (ztunnel's deliveries and the
	// connections it accepted) reach enrolled pods directly. Other packets
	// the node sends to an enrolled pod go through inbound capture (15006;
	// 15008 for port 15008), like a client's on another node, unless they
	// are kubelet's probes (ProbeCgroups). ztunnel must mark its sockets
	// with it (ztunnel.Config.Mark). Default 0x400.
	BypassMark uint32
	// ProbeCgroups are cgroup v2 directories (for example
	// /sys/fs/cgroup/system.slice/kubelet.service) whose processes' TCP may
	// reach enrolled pods from the node directly: kubelet's health probes,
	// which Kubernetes sends from the node and PeerAuthentication STRICT
	// would otherwise reset. A descendant cgroup matches too; the root
	// cgroup (every process) never does, nor a cgroup deeper than 8. A directory
	// that does not exist is skipped (logged); a cgroup that is re-created
	// (kubelet restarted by systemd) gets a new id, which
	// RefreshProbeCgroups (called by SetupNode and Reconcile) picks up.
	ProbeCgroups []string
	// ZtunnelCgroups are the cgroup v2 directories of ztunnel's process:
	// only packets from sockets in exactly these cgroups that carry
	// BypassMark reach enrolled pods directly (the mark alone is no proof:
	// since Linux 5.17 SO_MARK needs only CAP_NET_RAW, which a root
	// container has by default). SetupNode makes them the only ones
	// trusted. Empty: the calling process's cgroup (ProcessCgroupID). The
	// root cgroup is refused: every process not in a cgroup of its own is
	// in it (see LeaveRootCgroup).
	ZtunnelCgroups []string
	// AllowNodeAFXDP leaves AF_XDP usable in the node's network namespace.
	// By default the guard (SetupNode) refuses there every SOL_XDP socket
	// option, without which an AF_XDP socket cannot send: like a packet
	// socket with PACKET_QDISC_BYPASS (always refused), it would put frames
	// on an enrolled pod's veth past pod_egress. Set it for a node that
	// runs AF_XDP programs of its own (and trusts them as it trusts ztunnel).
	AllowNodeAFXDP bool
	// Logger receives structured logs. Nil discards them.
	Logger *slog.Logger
}

func (o *Options) setDefaults() {
	if o.PinPath == "" {
		o.PinPath = "/sys/fs/bpf/ambit"
	}
	if o.OutboundPort == 0 {
		o.OutboundPort = 15001
	}
	if o.InboundPort == 0 {
		o.InboundPort = 15006
	}
	if o.HBONEPort == 0 {
		o.HBONEPort = 15008
	}
	if o.Mark == 0 {
		o.Mark = 0x100
	}
	if o.RouteTable == 0 {
		o.RouteTable = 100
	}
	if o.LoopMark == 0 {
		o.LoopMark = 0x200
	}
	if o.BypassMark == 0 {
		o.BypassMark = DefaultBypassMark
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// DefaultBypassMark is Options.BypassMark's default.
const DefaultBypassMark = 0x400

// Pod is a pod to capture.
type Pod struct {
	// Name identifies the pod in logs and errors, e.g. "namespace/name".
	Name string
	// IPs are the pod's addresses. Only IPv4 is captured; IPv6 TCP of a
	// captured pod is dropped.
	IPs []netip.Addr
	// HostIfname is the node side of the pod's veth. Empty: the interface
	// of the route to the pod's first IPv4 address (else its first IPv6
	// one) in the node's namespace. Either way it must be a veth with its
	// peer in another namespace, reached by a /32 (/128) scope-link route
	// to that address (see ErrNoPodVeth).
	HostIfname string
}

// Stats count what the programs did, summed over CPUs.
type Stats struct {
	Outbound uint64 `json:"outbound"` // new outbound connections given to ztunnel
	Inbound  uint64 `json:"inbound"`  // new inbound plaintext connections given to ztunnel
	HBONE    uint64 `json:"hbone"`    // new HBONE connections given to ztunnel
	Socket   uint64 `json:"socket"`   // segments of connections ztunnel holds
	Refused  uint64 `json:"refused"`  // SYNs refused (RST) for want of a ztunnel listener
	Dropped  uint64 `json:"dropped"`  // packets dropped (unknown connection, spoofed, IPv6 TCP, tagged or foreign frames)
}

// Capture is the loaded capture of one node. Its programs, maps and links
// are pinned under Options.PinPath, so they keep working after Close or after
// the process exits; Load picks them up again. Uninstall removes everything.
type Capture struct {
	opts Options
	log  *slog.Logger

	mu       sync.Mutex // guards objs, guard, guardErr, links and skipped, and serialises changes
	objs     tcxObjects
	guard    guardObjects         // the setsockopt guard (guard.go)
	guardErr error                // why the guard is off, if it is
	links    map[string]link.Link // by pin name, e.g. "pod-pv0-ingress", "guard-sockopt"
	skipped  map[string]string    // pods not captured for want of a veth: name -> why
}

// ErrClosed is returned by the methods of a Capture after Close.
var ErrClosed = errors.New("capture is closed")

// ErrNoPodVeth is returned (wrapped, naming the pod and why) for a pod that
// has no veth capture can take: its veth is gone (a CNI DEL during a rolling
// update, a pod terminating while ztunnel restarts), or the device its
// address routes to is not a pod's veth (the uplink, lo, a bridge). Such a
// pod is skipped, never captured on that device: programs for a pod on the
// node's uplink would cut the node off.
var ErrNoPodVeth = errors.New("no pod veth")

const (
	linksDir   = "links"
	podPrefix  = "pod-"
	upPrefix   = "uplink-"
	ingressSfx = "-ingress"
	egressSfx  = "-egress"
)

// Load checks the node (see Check), loads the programs and maps, re-opens
// the links pinned by an earlier Load and moves them to the new programs.
func Load(opts Options) (*Capture, error) {
	opts.setDefaults()
	if err := mountBPFFS(opts.PinPath, opts.Logger); err != nil {
		return nil, err
	}
	if err := Check(opts.PinPath, opts.Logger); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(opts.PinPath, linksDir), 0o700); err != nil {
		return nil, fmt.Errorf("load capture: %w", err)
	}
	spec, err := loadCapture()
	if err != nil {
		return nil, fmt.Errorf("load capture spec: %w", err)
	}
	for name, v := range map[string]any{
		"outbound_port": opts.OutboundPort,
		"inbound_port":  opts.InboundPort,
		"hbone_port":    opts.HBONEPort,
		"capture_mark":  opts.Mark,
		"loop_mark":     opts.LoopMark,
		"bypass_mark":   opts.BypassMark,
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("load capture: set %s: %w", name, err)
		}
	}
	c := &Capture{opts: opts, log: opts.Logger, links: map[string]link.Link{}, skipped: map[string]string{}}
	err = spec.LoadAndAssign(&c.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: opts.PinPath}})
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		return nil, fmt.Errorf("load capture: maps pinned in %s are from an incompatible version; uninstall first: %w", opts.PinPath, err)
	}
	if err != nil {
		return nil, fmt.Errorf("load capture: %w", err)
	}
	c.loadGuard(spec)
	if err := c.openPinnedLinks(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// openPinnedLinks re-opens the links pinned by an earlier Load, moves them to
// this Load's programs, and forgets those whose interface is gone.
func (c *Capture) openPinnedLinks() error {
	dir := filepath.Join(c.opts.PinPath, linksDir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("open pinned links: %w", err)
	}
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, guardLink) {
			continue // replaced by attachGuard once the new one is in
		}
		l, err := link.LoadPinnedLink(filepath.Join(dir, name), nil)
		if err != nil {
			return fmt.Errorf("open pinned link %s: %w", name, err)
		}
		if linkIfindex(l) == 0 {
			c.log.Info("forgetting link of a deleted interface", "link", name)
			l.Unpin()
			l.Close()
			continue
		}
		if err := l.Update(c.program(name)); err != nil {
			l.Close()
			return fmt.Errorf("update pinned link %s: %w", name, err)
		}
		c.links[name] = l
	}
	return nil
}

func (c *Capture) program(linkName string) *ebpf.Program {
	switch {
	case strings.HasPrefix(linkName, upPrefix):
		return c.objs.UplinkIngress
	case strings.HasSuffix(linkName, egressSfx):
		return c.objs.PodEgress
	default:
		return c.objs.PodIngress
	}
}

func linkIfindex(l link.Link) int {
	info, err := l.Info()
	if err != nil || info.TCX() == nil {
		return 0
	}
	return int(info.TCX().Ifindex)
}

// Close releases the Capture's file descriptors. Capture stays in force: its
// links and maps are pinned. Close is idempotent.
func (c *Capture) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for name, l := range c.links {
		errs = append(errs, l.Close())
		delete(c.links, name)
	}
	errs = append(errs, c.objs.Close(), c.guard.Close())
	c.objs = tcxObjects{}
	c.guard = guardObjects{}
	return errors.Join(errs...)
}

// SetupNode does the node-wide setup, idempotently: the policy rule and the
// local route that deliver marked packets to local sockets, and the inbound
// program on the uplinks.
func (c *Capture) SetupNode() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.objs.Pods == nil {
		return ErrClosed
	}
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	defer cancel()
	o := c.opts
	rule := fmt.Sprintf("rule add fwmark %#x/%#x lookup %d pref %d", o.Mark, o.Mark, o.RouteTable, o.RouteTable)
	if out, err := c.ip(ctx, strings.Fields(rule)...); err != nil && !bytes.Contains(out, []byte("File exists")) {
		return fmt.Errorf("setup node: %w", err)
	}
	if _, err := c.ip(ctx, "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", fmt.Sprint(o.RouteTable)); err != nil {
		return fmt.Errorf("setup node: %w", err)
	}
	// Early demux would find ztunnel's socket for a packet that a local pod
	// sends to an enrolled pod of the node, and forwarding drops packets
	// that have a socket: such packets must be routed first, to reach
	// pod_egress and be captured.
	if err := c.sysctl(earlyDemux, "0"); err != nil {
		return fmt.Errorf("setup node: %w", err)
	}
	uplinks := o.Uplinks
	if len(uplinks) == 0 {
		if dev, err := c.routeDev(ctx, "default"); err == nil {
			uplinks = []string{dev}
		} else {
			c.log.Warn("no uplink: inbound capture takes the slower path through the pods' veths", "err", err)
		}
	}
	for _, dev := range uplinks {
		if err := c.attach(upPrefix+dev, dev, c.objs.UplinkIngress, ebpf.AttachTCXIngress); err != nil {
			return fmt.Errorf("setup node: %w", err)
		}
	}
	if err := c.refreshProbeCgroups(true); err != nil {
		return fmt.Errorf("setup node: %w", err)
	}
	zcg, err := c.setZtunnelCgroups()
	if err != nil {
		return fmt.Errorf("setup node: %w", err)
	}
	c.attachGuard()
	c.log.Info("node set up", "guard", c.guardErr == nil, "uplinks", uplinks, "mark", o.Mark, "table", o.RouteTable, "bypass_mark", o.BypassMark, "ztunnel_cgroups", zcg, "probe_cgroups", o.ProbeCgroups)
	return nil
}

// BypassMark returns the socket mark that lets ztunnel's packets reach
// enrolled pods directly (Options.BypassMark).
func (c *Capture) BypassMark() uint32 { return c.opts.BypassMark }

// RefreshProbeCgroups makes the probe_cgroups map hold the ids of
// Options.ProbeCgroups as they are now: a cgroup re-created since (kubelet
// restarted) has a new id. Call it now and then; SetupNode and Reconcile do.
func (c *Capture) RefreshProbeCgroups() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.objs.ProbeCgroups == nil {
		return ErrClosed
	}
	return c.refreshProbeCgroups(false)
}

// refreshProbeCgroups syncs the probe_cgroups map (c.mu held). Missing
// directories are logged (at warning level when loud).
func (c *Capture) refreshProbeCgroups(loud bool) error {
	want := map[uint64]bool{}
	for _, dir := range c.opts.ProbeCgroups {
		id, err := cgroupID(dir)
		if err != nil {
			lvl := slog.LevelDebug
			if loud {
				lvl = slog.LevelWarn
			}
			c.log.Log(context.Background(), lvl, "probe cgroup not found: its probes to enrolled pods get inbound capture", "cgroup", dir, "err", err)
			continue
		}
		want[id] = true
	}
	var (
		k     uint64
		v     uint8
		stale []uint64
	)
	it := c.objs.ProbeCgroups.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	errs := []error{it.Err()}
	for _, k := range stale {
		if err := c.objs.ProbeCgroups.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	for id := range want {
		if err := c.objs.ProbeCgroups.Put(id, uint8(1)); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("probe cgroups: %w", err)
	}
	return nil
}

// setZtunnelCgroups makes the ztunnel_cgroups map hold exactly the ids of
// Options.ZtunnelCgroups (c.mu held) and returns those directories. A
// previous ztunnel's cgroup is forgotten: its packets to pods get inbound
// capture from now on.
func (c *Capture) setZtunnelCgroups() ([]string, error) {
	dirs := c.opts.ZtunnelCgroups
	want := map[uint64]bool{}
	if len(dirs) == 0 {
		id, err := ProcessCgroupID()
		if err != nil {
			return nil, fmt.Errorf("ztunnel cgroup: %w", err)
		}
		if id == rootCgroupID {
			return nil, errors.New("ztunnel runs in the root cgroup, which every process without a cgroup of its own shares: run it in a cgroup of its own (LeaveRootCgroup)")
		}
		want[id] = true
		dirs = []string{fmt.Sprintf("(this process's, id %d)", id)}
	}
	for _, dir := range c.opts.ZtunnelCgroups {
		id, err := cgroupID(dir)
		if err != nil {
			return nil, fmt.Errorf("ztunnel cgroup: %w", err)
		}
		if id == rootCgroupID {
			return nil, fmt.Errorf("ztunnel cgroup %s is the root cgroup, which every process without a cgroup of its own shares: run ztunnel in a cgroup of its own (LeaveRootCgroup)", dir)
		}
		want[id] = true
	}
	var (
		k     uint64
		v     uint8
		stale []uint64
	)
	it := c.objs.ZtunnelCgroups.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	errs := []error{it.Err()}
	for _, k := range stale {
		if err := c.objs.ZtunnelCgroups.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	for id := range want {
		if err := c.objs.ZtunnelCgroups.Put(id, uint8(1)); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("ztunnel cgroups: %w", err)
	}
	return dirs, nil
}

// rootCgroupID is the id of a cgroup v2 hierarchy's root.
const rootCgroupID = 1

// ProcessCgroup returns the cgroup v2 directory of the calling process, from
// /proc/self/cgroup and the cgroup2 mount (in a cgroup namespace, the
// namespace's root is the mount's root).
func ProcessCgroup() (string, error) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", fmt.Errorf("process cgroup: %w", err)
	}
	var path string
	found := false
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			path, found = p, true
			break
		}
	}
	if !found {
		return "", errors.New("process cgroup: no cgroup v2 entry in /proc/self/cgroup")
	}
	mounts, err := cgroup2Mounts()
	if err != nil {
		return "", fmt.Errorf("process cgroup: %w", err)
	}
	for _, m := range mounts {
		if rel, err := filepath.Rel(m.root, path); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
			return filepath.Join(m.point, rel), nil
		}
	}
	return "", fmt.Errorf("process cgroup: %s is under no cgroup2 mount", path)
}

type cgroupMount struct{ point, root string }

// cgroup2Mounts returns the cgroup2 mounts, each with the cgroup it shows as
// its root, from /proc/self/mountinfo.
func cgroup2Mounts() ([]cgroupMount, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []cgroupMount
	for _, line := range strings.Split(string(b), "\n") {
		// id parent major:minor root mountpoint options [optional...] - fstype source super
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) >= 5 && len(g) >= 1 && g[0] == "cgroup2" {
			out = append(out, cgroupMount{point: unescapeMount(f[4]), root: unescapeMount(f[3])})
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no cgroup2 file system mounted")
	}
	return out, nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var out strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				out.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		out.WriteByte(s[i])
	}
	return out.String()
}

// withProcessCgroup calls fn with the calling process's cgroup v2
// directory (ProcessCgroup).
func withProcessCgroup(fn func(dir string) error) error {
	return withCgroup2(func() error {
		dir, err := ProcessCgroup()
		if err != nil {
			return err
		}
		return fn(dir)
	})
}

// withCgroup2 calls fn with a cgroup2 file system in view. Where none is
// mounted (ip netns exec remounts /sys), it mounts one on a temporary
// directory for the call.
func withCgroup2(fn func() error) error {
	if _, err := cgroup2Mounts(); err == nil {
		return fn()
	}
	tmp, err := os.MkdirTemp("", "ambit-cgroup2-")
	if err != nil {
		return fmt.Errorf("cgroup2: %w", err)
	}
	defer os.Remove(tmp)
	if err := unix.Mount("cgroup2", tmp, "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("cgroup2: none mounted, and mounting one: %w", err)
	}
	defer unix.Unmount(tmp, unix.MNT_DETACH)
	return fn()
}

// ProcessCgroupID returns the id of the calling process's cgroup v2.
func ProcessCgroupID() (id uint64, err error) {
	err = withProcessCgroup(func(dir string) error {
		id, err = cgroupID(dir)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("process cgroup: %w", err)
	}
	return id, nil
}

// InRootCgroup reports whether the calling process is in the cgroup v2
// root: capture cannot tell its sockets from any other such process's.
func InRootCgroup() (bool, error) {
	id, err := ProcessCgroupID()
	return id == rootCgroupID, err
}

// LeaveRootCgroup moves the calling process, when it is in the root
// cgroup, into the root's child cgroup name (created if needed), and
// returns that cgroup's path below the root ("" when the process stayed
// where it was). Sockets keep the cgroup they were created in: call it
// before opening any. ztunnel does, so that capture can tell its packets
// (ZtunnelCgroups) when it runs as a plain process (a host without
// systemd, a test harness); in a pod or a systemd unit it has a cgroup of
// its own already.
func LeaveRootCgroup(name string) (string, error) {
	moved := ""
	err := withProcessCgroup(func(dir string) error {
		id, err := cgroupID(dir)
		if err != nil || id != rootCgroupID {
			return err
		}
		moved = "/" + name
		return JoinCgroup(filepath.Join(dir, name))
	})
	return moved, err
}

// JoinCgroup moves the calling process (all its threads) into the cgroup
// v2 directory dir, creating it if needed. Sockets keep the cgroup they
// were created in: call it before opening any.
func JoinCgroup(dir string) error {
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("join cgroup: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(fmt.Sprint(os.Getpid())), 0o644); err != nil {
		return fmt.Errorf("join cgroup %s: %w", dir, err)
	}
	return nil
}

// cgroupID returns the id of the cgroup v2 directory dir: its inode number.
func cgroupID(dir string) (uint64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("%s is not in a cgroup v2 file system", dir)
	}
	var s unix.Stat_t
	if err := unix.Stat(dir, &s); err != nil {
		return 0, err
	}
	return s.Ino, nil
}

// AddPod captures p: from its return on, every TCP connection the pod opens
// or receives goes to ztunnel. Call it before the pod's process starts (a
// CNI-like hook, once the veth exists) so that no packet escapes. AddPod is
// idempotent; calling it again with other IPs adds them.
func (c *Capture) AddPod(ctx context.Context, p Pod) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.objs.Pods == nil {
		return ErrClosed
	}
	return c.addPod(ctx, p)
}

func (c *Capture) addPod(ctx context.Context, p Pod) error {
	nv, err := c.nodeView(ctx)
	if err != nil {
		return fmt.Errorf("add pod %s: %w", p.Name, err)
	}
	dev, ifindex, err := c.resolve(ctx, nv, p)
	if err != nil {
		c.skip(p, err)
		return fmt.Errorf("add pod %s: %w", p.Name, err)
	}
	delete(c.skipped, p.Name)
	return c.attachPod(p, dev, ifindex)
}

// skip records and logs that p is not captured.
func (c *Capture) skip(p Pod, err error) {
	c.skipped[p.Name] = err.Error()
	c.log.Error("pod not captured", "pod", p.Name, "ips", p.IPs, "err", err)
}

// attachPod captures p on its veth dev (resolved).
func (c *Capture) attachPod(p Pod, dev string, ifindex int) error {
	// Addresses first: once the programs are attached, traffic from an
	// address the map does not know is dropped.
	for _, ip := range p.IPs {
		if !ip.Is4() {
			continue
		}
		if err := c.objs.Pods.Put(key(ip), capturePod{Ifindex: uint32(ifindex)}); err != nil {
			return fmt.Errorf("add pod %s: %w", p.Name, err)
		}
	}
	// ztunnel's own HBONE connections to the pod come back in through the
	// veth with the node's address as source.
	if err := c.sysctl(acceptLocal(dev), "1"); err != nil {
		return fmt.Errorf("add pod %s: %w", p.Name, err)
	}
	if err := c.attach(podPrefix+dev+ingressSfx, dev, c.objs.PodIngress, ebpf.AttachTCXIngress); err != nil {
		return fmt.Errorf("add pod %s: %w", p.Name, err)
	}
	if err := c.attach(podPrefix+dev+egressSfx, dev, c.objs.PodEgress, ebpf.AttachTCXEgress); err != nil {
		return fmt.Errorf("add pod %s: %w", p.Name, err)
	}
	c.log.Info("pod captured", "pod", p.Name, "dev", dev, "ifindex", ifindex, "ips", p.IPs)
	return nil
}

// RemovePod stops capturing p (its veth found as in AddPod; a veth that is
// gone is fine). Close the connections ztunnel holds for the pod first: from
// here on, the pod's packets are no longer matched to ztunnel's sockets.
// RemovePod is idempotent.
func (c *Capture) RemovePod(ctx context.Context, p Pod) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.objs.Pods == nil {
		return ErrClosed
	}
	delete(c.skipped, p.Name)
	// Only a device the pod is captured on is released: the veth may be
	// gone with the pod, and the route to its address may lead elsewhere.
	dev := c.devOfIPs(p.IPs)
	if dev == "" && p.HostIfname != "" && c.links[podPrefix+p.HostIfname+ingressSfx] != nil {
		dev = p.HostIfname
	}
	var errs []error
	if dev != "" {
		errs = append(errs, c.release(dev))
	}
	for _, ip := range p.IPs {
		if ip.Is4() {
			if err := c.objs.Pods.Delete(key(ip)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("remove pod %s: %w", p.Name, err)
	}
	c.log.Info("pod released", "pod", p.Name, "dev", dev)
	return nil
}

// devOfIPs finds the veth of a pod from the pods map, or "".
func (c *Capture) devOfIPs(ips []netip.Addr) string {
	for _, ip := range ips {
		var v capturePod
		if ip.Is4() && c.objs.Pods.Lookup(key(ip), &v) == nil {
			var name string
			c.inNetns(func() error {
				if ifi, err := net.InterfaceByIndex(int(v.Ifindex)); err == nil {
					name = ifi.Name
				}
				return nil
			})
			if name != "" {
				return name
			}
			for n, l := range c.links {
				if strings.HasPrefix(n, podPrefix) && strings.HasSuffix(n, ingressSfx) && linkIfindex(l) == int(v.Ifindex) {
					return strings.TrimSuffix(strings.TrimPrefix(n, podPrefix), ingressSfx)
				}
			}
		}
	}
	return ""
}

// Reconcile makes the captured pods exactly desired: it captures the new
// ones, releases those not in desired (and those whose veth is gone), and
// leaves the others untouched. ztunnel calls it with the local enrolled pods
// of its model whenever they change, and once after a restart. Errors of
// single pods are joined; the others are still reconciled.
func (c *Capture) Reconcile(ctx context.Context, desired []Pod) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.objs.Pods == nil {
		return ErrClosed
	}
	nv, err := c.nodeView(ctx)
	if err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	var errs []error
	wantDev := map[string]bool{}
	wantIP := map[[4]byte]uint32{}
	type resolved struct {
		p       Pod
		dev     string
		ifindex int
	}
	var add []resolved
	skipped := map[string]string{}
	for _, p := range desired {
		dev, ifindex, err := c.resolve(ctx, nv, p)
		if err != nil {
			errs = append(errs, fmt.Errorf("reconcile pod %s: %w", p.Name, err))
			skipped[p.Name] = err.Error()
			if c.skipped[p.Name] != err.Error() { // once per reason: callers retry
				c.log.Error("pod not captured", "pod", p.Name, "ips", p.IPs, "err", err)
			}
			// Fail closed: a veth the pod is captured on and that still
			// exists stays captured (say its route is gone but the pod
			// still sends); one that is gone is released below.
			if dev, ifindex := c.capturedOn(nv, p.IPs); dev != "" {
				wantDev[dev] = true
				for _, ip := range p.IPs {
					if ip.Is4() {
						wantIP[ip.As4()] = uint32(ifindex)
					}
				}
			}
			continue
		}
		wantDev[dev] = true
		for _, ip := range p.IPs {
			if ip.Is4() {
				wantIP[ip.As4()] = uint32(ifindex)
			}
		}
		add = append(add, resolved{p, dev, ifindex})
	}
	c.skipped = skipped
	for name := range c.links {
		if !strings.HasPrefix(name, podPrefix) {
			continue
		}
		dev := strings.TrimSuffix(strings.TrimSuffix(strings.TrimPrefix(name, podPrefix), ingressSfx), egressSfx)
		if !wantDev[dev] {
			errs = append(errs, c.release(dev))
		}
	}
	var (
		k    [4]byte
		v    capturePod
		gone [][4]byte
	)
	it := c.objs.Pods.Iterate()
	for it.Next(&k, &v) {
		if want, ok := wantIP[k]; !ok || want != v.Ifindex {
			gone = append(gone, k)
		}
	}
	errs = append(errs, it.Err())
	for _, k := range gone {
		if err := c.objs.Pods.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	for _, r := range add {
		if err := c.attachPod(r.p, r.dev, r.ifindex); err != nil {
			errs = append(errs, fmt.Errorf("reconcile pod %s: %w", r.p.Name, err))
		}
	}
	errs = append(errs, c.refreshProbeCgroups(false))
	return errors.Join(errs...)
}

// Pods returns the captured addresses with the veth each is captured on.
func (c *Capture) Pods() (map[netip.Addr]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.objs.Pods == nil {
		return nil, ErrClosed
	}
	byIndex := map[int]string{}
	for name, l := range c.links {
		if strings.HasPrefix(name, podPrefix) && strings.HasSuffix(name, ingressSfx) {
			byIndex[linkIfindex(l)] = strings.TrimSuffix(strings.TrimPrefix(name, podPrefix), ingressSfx)
		}
	}
	out := map[netip.Addr]string{}
	var (
		k [4]byte
		v capturePod
	)
	it := c.objs.Pods.Iterate()
	for it.Next(&k, &v) {
		out[netip.AddrFrom4(k)] = byIndex[int(v.Ifindex)]
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list pods: %w", err)
	}
	return out, nil
}

// Skipped returns the pods that are not captured because they have no veth
// capture can take (see ErrNoPodVeth), by name, with the reason: those of
// the last Reconcile, and those AddPod refused since.
func (c *Capture) Skipped() map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]string, len(c.skipped))
	for k, v := range c.skipped {
		out[k] = v
	}
	return out
}

// Stats returns the programs' counters.
func (c *Capture) Stats() (Stats, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.objs.Stats == nil {
		return Stats{}, ErrClosed
	}
	var s Stats
	for i, f := range []*uint64{&s.Outbound, &s.Inbound, &s.HBONE, &s.Socket, &s.Refused, &s.Dropped} {
		var per []uint64
		if err := c.objs.Stats.Lookup(uint32(i), &per); err != nil {
			return Stats{}, fmt.Errorf("read stats: %w", err)
		}
		for _, n := range per {
			*f += n
		}
	}
	return s, nil
}

// Status is what the capture of a node is doing, for an admin endpoint.
type Status struct {
	PinPath string            `json:"pinPath"`
	Pods    map[string]string `json:"pods"`              // captured address -> host veth
	Skipped map[string]string `json:"skipped,omitempty"` // pod -> why it is not captured
	Stats   Stats             `json:"stats"`
	Guard   string            `json:"guard"` // "on", "on, but <what it does not see>", or "off: <why>"
}

// Status returns the node's captured pods, the skipped ones, the programs'
// counters and whether the guard is in force.
func (c *Capture) Status() (Status, error) {
	pods, err := c.Pods()
	if err != nil {
		return Status{}, err
	}
	st, err := c.Stats()
	if err != nil {
		return Status{}, err
	}
	s := Status{PinPath: c.opts.PinPath, Pods: make(map[string]string, len(pods)), Skipped: c.Skipped(), Stats: st, Guard: "on"}
	for ip, dev := range pods {
		s.Pods[ip.String()] = dev
	}
	if err := c.Guard(); err != nil {
		s.Guard = "off: " + err.Error()
	} else if gap := compatGap(); gap != "" {
		s.Guard = "on, but " + gap
	}
	return s, nil
}

// Uninstall removes everything capture put on the node (see the function
// Uninstall). The Capture is closed afterwards.
func (c *Capture) Uninstall() error {
	closeErr := c.Close()
	if err := Uninstall(c.opts); err != nil {
		return err
	}
	c.log.Info("capture uninstalled", "pin_path", c.opts.PinPath)
	return closeErr
}

// Uninstall removes everything capture put on the node of opts, whether or
// not a Capture is loaded: the pinned links (which detaches the programs
// once no process holds them), the pinned maps, the pin directory, the
// policy rule and the local route, the pods' accept_local, and it turns TCP
// early demux back on.
func Uninstall(opts Options) error {
	opts.setDefaults()
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	defer cancel()
	c := &Capture{opts: opts, log: opts.Logger}
	var errs []error
	ents, _ := os.ReadDir(filepath.Join(opts.PinPath, linksDir))
	for _, e := range ents {
		if dev, ok := strings.CutSuffix(strings.TrimPrefix(e.Name(), podPrefix), ingressSfx); ok && strings.HasPrefix(e.Name(), podPrefix) {
			if err := c.sysctl(acceptLocal(dev), "0"); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	// Detach each pinned link before removing its pin: a removed pin drops
	// its reference from a kernel work queue (bpf_link_put), so the
	// programs could stay attached for a while after Uninstall returned,
	// and as long as any process (a ztunnel still running) holds the link.
	for _, e := range ents {
		l, err := link.LoadPinnedLink(filepath.Join(opts.PinPath, linksDir, e.Name()), nil)
		if err != nil {
			continue // not a link; RemoveAll below takes it
		}
		if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("detach %s: %w", e.Name(), err))
		}
		l.Close()
	}
	if err := os.RemoveAll(opts.PinPath); err != nil {
		errs = append(errs, err)
	}
	mark, table := fmt.Sprintf("%#x/%#x", opts.Mark, opts.Mark), fmt.Sprint(opts.RouteTable)
	if out, err := c.ip(ctx, "rule", "del", "fwmark", mark, "lookup", table, "pref", table); err != nil && !bytes.Contains(out, []byte("No such file")) {
		errs = append(errs, err)
	}
	if out, err := c.ip(ctx, "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", table); err != nil && !bytes.Contains(out, []byte("No such process")) {
		errs = append(errs, err)
	}
	errs = append(errs, c.sysctl(earlyDemux, "1")) // the kernel's default
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("uninstall capture: %w", err)
	}
	return nil
}

// attach attaches prog to dev as the pinned link name, unless that link
// exists on dev already. A pinned link on an older incarnation of dev (same
// name, another ifindex) is replaced.
func (c *Capture) attach(name, dev string, prog *ebpf.Program, typ ebpf.AttachType) error {
	var ifindex int
	err := c.inNetns(func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		ifindex = ifi.Index
		if l, ok := c.links[name]; ok {
			if linkIfindex(l) == ifindex {
				return nil
			}
			l.Unpin()
			l.Close()
			delete(c.links, name)
		}
		l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: typ, Anchor: link.Head()})
		if errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("this kernel has no TCX links (Linux >= 6.6 needed): %w", err)
		}
		if err != nil {
			return err
		}
		if err := l.Pin(filepath.Join(c.opts.PinPath, linksDir, name)); err != nil {
			l.Close()
			return err
		}
		c.links[name] = l
		return nil
	})
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", name, dev, err)
	}
	return nil
}

// release detaches the programs of a pod's veth and undoes its sysctl (when
// the veth still exists).
func (c *Capture) release(dev string) error {
	err := errors.Join(c.detach(podPrefix+dev+ingressSfx), c.detach(podPrefix+dev+egressSfx))
	if serr := c.sysctl(acceptLocal(dev), "0"); serr != nil && !errors.Is(serr, fs.ErrNotExist) {
		err = errors.Join(err, serr)
	}
	return err
}

func acceptLocal(dev string) string { return "net/ipv4/conf/" + dev + "/accept_local" }

// detach unpins and closes the link name, detaching its program.
func (c *Capture) detach(name string) error {
	l, ok := c.links[name]
	if !ok {
		return nil
	}
	delete(c.links, name)
	if err := l.Unpin(); err != nil {
		l.Close()
		return fmt.Errorf("detach %s: %w", name, err)
	}
	return l.Close()
}

// node is what resolve needs to know of the node, read once per change.
type node struct {
	uplinks map[string]bool       // Options.Uplinks, the default routes' devices, lo
	veths   map[string]bool       // veths whose peer is in another namespace
	host    map[netip.Addr]string // /32 and /128 scope-link routes of the main table: device
}

// nodeView reads the node's links and routes for resolve.
func (c *Capture) nodeView(ctx context.Context) (*node, error) {
	nv := &node{uplinks: map[string]bool{"lo": true}, veths: map[string]bool{}, host: map[netip.Addr]string{}}
	for _, dev := range c.opts.Uplinks {
		nv.uplinks[dev] = true
	}
	for name := range c.links {
		if dev, ok := strings.CutPrefix(name, upPrefix); ok {
			nv.uplinks[dev] = true
		}
	}
	var links []struct {
		Name     string `json:"ifname"`
		NetnsID  *int   `json:"link_netnsid"`
		LinkInfo struct {
			Kind string `json:"info_kind"`
		} `json:"linkinfo"`
	}
	if err := c.ipJSON(ctx, &links, "-d", "link", "show"); err != nil {
		return nil, err
	}
	for _, l := range links {
		if l.LinkInfo.Kind == "veth" && l.NetnsID != nil {
			nv.veths[l.Name] = true
		}
	}
	for _, family := range []string{"-4", "-6"} {
		var routes []struct {
			Dst     string `json:"dst"`
			Dev     string `json:"dev"`
			Gateway string `json:"gateway"`
			Scope   string `json:"scope"`
			Type    string `json:"type"`
		}
		if err := c.ipJSON(ctx, &routes, family, "route", "show", "table", "main"); err != nil {
			if family == "-6" { // a node without IPv6
				c.log.Debug("no IPv6 routes", "err", err)
				continue
			}
			return nil, err
		}
		for _, r := range routes {
			if r.Dst == "default" {
				nv.uplinks[r.Dev] = true
				continue
			}
			// iproute2 prints host routes without their prefix length.
			ip, err := netip.ParseAddr(r.Dst)
			if err != nil || r.Gateway != "" || (r.Type != "" && r.Type != "unicast") {
				continue
			}
			if ip.Is4() && r.Scope != "link" { // IPv6 routes have no scope
				continue
			}
			nv.host[ip] = r.Dev
		}
	}
	return nv, nil
}

// podAddr is the address p is found by: its first IPv4 address, else its
// first IPv6 one.
func podAddr(p Pod) netip.Addr {
	var v6 netip.Addr
	for _, a := range p.IPs {
		if a.Is4() {
			return a
		}
		if !v6.IsValid() && a.Is6() {
			v6 = a
		}
	}
	return v6
}

// resolve finds the host side of p's veth: HostIfname, or the device of the
// route to p's address (podAddr). It accepts only a veth whose peer lives in
// another network namespace and to which a /32 (/128) scope-link route leads
// for that address, and never an uplink, the device of a default route, or
// lo. Anything else is an error wrapping ErrNoPodVeth: when a pod's veth is
// gone, its address routes through the uplink, and pod programs there would
// drop the node's own traffic.
func (c *Capture) resolve(ctx context.Context, nv *node, p Pod) (dev string, ifindex int, err error) {
	ip := podAddr(p)
	if !ip.IsValid() {
		return "", 0, fmt.Errorf("no address: %w", ErrNoPodVeth)
	}
	dev = p.HostIfname
	if dev == "" {
		if dev, err = c.routeDev(ctx, ip.String()); err != nil {
			return "", 0, fmt.Errorf("%w: %w", ErrNoPodVeth, err)
		}
	}
	switch {
	case nv.uplinks[dev]:
		return "", 0, fmt.Errorf("%w: %s routes through %s, an uplink or the node's own device (the pod's veth is gone?)", ErrNoPodVeth, ip, dev)
	case !nv.veths[dev]:
		return "", 0, fmt.Errorf("%w: %s routes through %s, which is not a veth with its peer in another namespace", ErrNoPodVeth, ip, dev)
	case nv.host[ip] != dev:
		return "", 0, fmt.Errorf("%w: no /%d scope-link route to %s through %s", ErrNoPodVeth, ip.BitLen(), ip, dev)
	}
	err = c.inNetns(func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return fmt.Errorf("%w: host interface: %w", ErrNoPodVeth, err)
		}
		ifindex = ifi.Index
		return nil
	})
	return dev, ifindex, err
}

// capturedOn returns the pod veth that one of ips is captured on, if it
// still exists, or "".
func (c *Capture) capturedOn(nv *node, ips []netip.Addr) (string, int) {
	for _, ip := range ips {
		var v capturePod
		if !ip.Is4() || c.objs.Pods.Lookup(key(ip), &v) != nil {
			continue
		}
		for n, l := range c.links {
			dev, ok := strings.CutPrefix(n, podPrefix)
			if ok && strings.HasSuffix(n, ingressSfx) && linkIfindex(l) == int(v.Ifindex) {
				if dev = strings.TrimSuffix(dev, ingressSfx); nv.veths[dev] {
					return dev, int(v.Ifindex)
				}
			}
		}
	}
	return "", 0
}

// ipJSON runs ip -j args and decodes its output into v.
func (c *Capture) ipJSON(ctx context.Context, v any, args ...string) error {
	out, err := c.ip(ctx, append([]string{"-j"}, args...)...)
	if err != nil {
		return err
	}
	if len(bytes.TrimSpace(out)) == 0 {
		return nil
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("parse ip %s: %w", strings.Join(args, " "), err)
	}
	return nil
}

// routeDev returns the interface of the route to dst ("default" or an IP).
func (c *Capture) routeDev(ctx context.Context, dst string) (string, error) {
	args := []string{"-j", "route", "get", dst}
	if dst == "default" {
		args = []string{"-j", "route", "show", "default"}
	}
	out, err := c.ip(ctx, args...)
	if err != nil {
		return "", err
	}
	var routes []struct {
		Dev string `json:"dev"`
	}
	if err := json.Unmarshal(out, &routes); err != nil {
		return "", fmt.Errorf("parse ip %s: %w", strings.Join(args, " "), err)
	}
	if len(routes) == 0 || routes[0].Dev == "" {
		return "", fmt.Errorf("no route to %s", dst)
	}
	return routes[0].Dev, nil
}

// commandTimeout bounds the iproute2 commands of SetupNode and Uninstall.
const commandTimeout = 30 * time.Second

// ip runs iproute2 in the node's namespace and returns its output.
func (c *Capture) ip(ctx context.Context, args ...string) ([]byte, error) {
	name := "ip"
	if c.opts.Netns != "" {
		args = append([]string{"--net=" + c.opts.Netns, "ip"}, args...)
		name = "nsenter"
	}
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

const earlyDemux = "net/ipv4/tcp_early_demux"

// sysctl sets /proc/sys/<name> in the node's namespace.
func (c *Capture) sysctl(name, value string) error {
	return c.inNetns(func() error {
		if err := os.WriteFile(filepath.Join("/proc/sys", name), []byte(value), 0o644); err != nil {
			return fmt.Errorf("sysctl: %w", err)
		}
		return nil
	})
}

// inNetns runs fn on a thread inside the node's namespace.
func (c *Capture) inNetns(fn func() error) error {
	if c.opts.Netns == "" {
		return fn()
	}
	f, err := os.Open(c.opts.Netns)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer f.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open netns: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns %s: %w", c.opts.Netns, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("leave netns %s: %w", c.opts.Netns, err) // the locked thread dies
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

func key(ip netip.Addr) [4]byte { return ip.As4() }
