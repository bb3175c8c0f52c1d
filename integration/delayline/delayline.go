// Package delayline is a netem stand-in for the test harness (this kernel
// has no sch_netem): a bounded frame forwarder that puts a one-way delay and
// a random loss between a node of a netns.Topology and the underlay bridge.
//
// Insert takes the node's port out of the underlay bridge and joins it to a
// new veth pair whose other end is in the bridge; two AF_PACKET sockets in
// the underlay namespace carry every frame across, each direction through a
// queue of at most QueueFrames frames (the excess is dropped, as a full
// router queue does) released Delay after it arrived, each frame lost with
// probability Loss, and frames that Drop matches discarded (a firewall
// dropping UDP 15008, say). Segmentation and checksum offloads of the
// topology's uplinks are turned off, so that every frame is a real,
// MTU-sized, checksummed packet and loss applies per packet.
package delayline

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/integration/netns"
)

// DefaultQueueFrames bounds each direction's queue.
const DefaultQueueFrames = 4096

// maxFrame is the largest frame carried (offloads off: MTU 1500 + header).
const maxFrame = 9216

// Config is a line's behaviour; Set changes it while the line runs.
type Config struct {
	// Delay is added to each frame, each way.
	Delay time.Duration
	// Loss is the probability that a frame is dropped, each way (0..1).
	Loss float64
	// Drop, if set, discards the frames it matches (Ethernet frames).
	Drop func(frame []byte) bool
}

// Line is a running delay line. Close removes it and restores the
// node's port in the bridge.
type Line struct {
	topo        *netns.Topology
	port, a, b  string // the node's bridge port, the new veth pair (a: ours, b: in br0)
	queueFrames int

	cfg atomic.Pointer[Config]
	fds [2]int // AF_PACKET sockets on port and a

	forwarded, lost, dropped, overflow atomic.Uint64

	closeOnce sync.Once
	stop      chan struct{}
	wg        sync.WaitGroup
}

// Stats are a line's counters, both directions together.
type Stats struct {
	Forwarded uint64 // frames sent on
	Lost      uint64 // frames dropped by Loss
	Dropped   uint64 // frames dropped by Drop
	Overflow  uint64 // frames dropped because a queue was full
}

// Insert puts a delay line between node n and the underlay bridge.
// queueFrames bounds each direction's queue (DefaultQueueFrames if zero).
func Insert(t *netns.Topology, n *netns.Node, cfg Config, queueFrames int) (*Line, error) {
	if queueFrames <= 0 {
		queueFrames = DefaultQueueFrames
	}
	l := &Line{
		topo: t, port: fmt.Sprintf("u%d", n.Index), a: fmt.Sprintf("dl%da", n.Index), b: fmt.Sprintf("dl%db", n.Index),
		queueFrames: queueFrames, stop: make(chan struct{}), fds: [2]int{-1, -1},
	}
	l.Set(cfg)
	for _, node := range t.Nodes {
		if err := node.NS.Do(func() error { return noOffloads(netns.Uplink) }); err != nil {
			return nil, fmt.Errorf("delay line: node %s: %w", node.Name, err)
		}
	}
	err := t.Underlay.IP(fmt.Sprintf("link set %s nomaster\nlink add %s type veth peer name %s\nlink set %s master br0 up\nlink set %s up",
		l.port, l.a, l.b, l.b, l.a))
	if err != nil {
		return nil, fmt.Errorf("delay line: %w", err)
	}
	err = t.Underlay.Do(func() error {
		for _, dev := range []string{l.port, l.a, l.b} {
			if err := noOffloads(dev); err != nil {
				return err
			}
		}
		for i, dev := range []string{l.port, l.a} {
			fd, err := packetSocket(dev)
			if err != nil {
				return err
			}
			l.fds[i] = fd
		}
		return nil
	})
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("delay line: %w", err)
	}
	l.wg.Add(2)
	go l.direction(l.fds[0], l.fds[1]) // from the node
	go l.direction(l.fds[1], l.fds[0]) // to the node
	return l, nil
}

// Set replaces the line's configuration; frames already queued keep their
// release time.
func (l *Line) Set(cfg Config) { l.cfg.Store(&cfg) }

// Stats returns the counters.
func (l *Line) Stats() Stats {
	return Stats{Forwarded: l.forwarded.Load(), Lost: l.lost.Load(), Dropped: l.dropped.Load(), Overflow: l.overflow.Load()}
}

// Close stops the forwarder, deletes the veth pair and puts the node's port
// back in the bridge. It is idempotent.
func (l *Line) Close() error {
	var err error
	l.closeOnce.Do(func() {
		close(l.stop)
		l.wg.Wait()
		for _, fd := range l.fds {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
		err = l.topo.Underlay.IP(fmt.Sprintf("link del %s\nlink set %s master br0 up", l.a, l.port))
	})
	return err
}

type frame struct {
	at   time.Time
	data []byte
}

// direction forwards frames read from in to out: a reader feeding a
// bounded queue, a writer releasing each frame at its time.
func (l *Line) direction(in, out int) {
	defer l.wg.Done()
	q := make(chan frame, l.queueFrames)
	var wg sync.WaitGroup
	wg.Go(func() {
		for f := range q {
			if d := time.Until(f.at); d > 0 {
				select {
				case <-time.After(d):
				case <-l.stop:
					return
				}
			}
			if err := unix.Send(out, f.data, 0); err == nil {
				l.forwarded.Add(1)
			}
		}
	})
	defer wg.Wait()
	defer close(q)
	buf := make([]byte, maxFrame)
	for {
		n, from, err := unix.Recvfrom(in, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) { // SO_RCVTIMEO: look at stop
				select {
				case <-l.stop:
					return
				default:
					continue
				}
			}
			return
		}
		if sa, ok := from.(*unix.SockaddrLinklayer); ok && sa.Pkttype == unix.PACKET_OUTGOING {
			continue // our own sends on this device
		}
		if n == 0 {
			select {
			case <-l.stop:
				return
			default:
				continue
			}
		}
		cfg := l.cfg.Load()
		if cfg.Drop != nil && cfg.Drop(buf[:n]) {
			l.dropped.Add(1)
			continue
		}
		if cfg.Loss > 0 && rand.Float64() < cfg.Loss {
			l.lost.Add(1)
			continue
		}
		f := frame{at: time.Now().Add(cfg.Delay), data: append([]byte(nil), buf[:n]...)}
		select {
		case q <- f:
		default:
			l.overflow.Add(1)
		}
	}
}

// packetSocket opens an AF_PACKET socket bound to dev, all protocols, in
// the current namespace.
func packetSocket(dev string) (int, error) {
	ifi, err := interfaceIndex(dev)
	if err != nil {
		return -1, err
	}
	proto := htons(unix.ETH_P_ALL)
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(proto))
	if err != nil {
		return -1, fmt.Errorf("packet socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifi}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("bind packet socket to %s: %w", dev, err)
	}
	// A blocked recvfrom on a packet socket ignores shutdown: wake up to
	// look at the stop channel.
	tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("packet socket timeout: %w", err)
	}
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 8<<20)
	return fd, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func interfaceIndex(dev string) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(dev)
	if err != nil {
		return 0, err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFINDEX, ifr); err != nil {
		return 0, fmt.Errorf("interface %s: %w", dev, err)
	}
	return int(ifr.Uint32()), nil
}

// Legacy ethtool commands (linux/ethtool.h) that turn an offload off.
const (
	ethtoolSTXCSUM = 0x17 // transmit checksum
	ethtoolSSG     = 0x19 // scatter-gather
	ethtoolSTSO    = 0x1f // TCP segmentation
	ethtoolSGSO    = 0x24 // generic segmentation
	ethtoolSGRO    = 0x2c // generic receive offload
)

// noOffloads turns dev's segmentation, receive aggregation and transmit
// checksum offloads off (as ethtool -K, which this host lacks).
func noOffloads(dev string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	for _, cmd := range []uint32{ethtoolSTSO, ethtoolSGSO, ethtoolSGRO, ethtoolSTXCSUM, ethtoolSSG} {
		val := new([2]uint32) // struct ethtool_value {u32 cmd; u32 data}: data 0, off
		val[0] = cmd
		var ifr struct { // struct ifreq with ifr_data
			name [unix.IFNAMSIZ]byte
			data unsafe.Pointer
			_    [16]byte
		}
		copy(ifr.name[:unix.IFNAMSIZ-1], dev)
		ifr.data = unsafe.Pointer(val)
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
		runtime.KeepAlive(val)
		if errno != 0 {
			return fmt.Errorf("%s: ethtool command %#x: %w", dev, cmd, errno)
		}
	}
	return nil
}
