package netns

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Capture is a tcpdump running inside a namespace, writing a pcap file.
type Capture struct {
	// File is the pcap file being written.
	File string

	cmd  *exec.Cmd
	done chan error
}

// StartCapture starts tcpdump on ifname inside the namespace, writing every
// packet that matches filter (pcap-filter syntax, e.g. "tcp") to file. It
// returns once tcpdump is capturing.
func (n *NS) StartCapture(ifname, file, filter string) (*Capture, error) {
	args := []string{"netns", "exec", n.Name, "tcpdump", "-n", "-U", "--immediate-mode", "-Z", "root", "-s", "0", "-i", ifname, "-w", file}
	if filter != "" {
		args = append(args, filter)
	}
	cmd := exec.Command("ip", args...)
	// tcpdump dies with the test process, even one killed by a test timeout.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, fmt.Errorf("start capture: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start capture: %w", err)
	}
	c := &Capture{File: file, cmd: cmd, done: make(chan error, 1)}
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		var lines []string
		for sc.Scan() {
			lines = append(lines, sc.Text())
			if strings.Contains(sc.Text(), "listening on") {
				ready <- ""
			}
		}
		ready <- strings.Join(lines, "; ")
		c.done <- cmd.Wait()
	}()
	select {
	case msg := <-ready:
		if msg != "" {
			cmd.Process.Kill()
			return nil, fmt.Errorf("start capture on %s: tcpdump: %s", ifname, msg)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		return nil, fmt.Errorf("start capture on %s: tcpdump did not start", ifname)
	}
	return c, nil
}

// Stop stops tcpdump, letting it flush, and returns the TCP/IPv4 packets it
// captured.
func (c *Capture) Stop() ([]Packet, error) {
	// Give in-flight packets a moment to be written (-U flushes per packet).
	time.Sleep(50 * time.Millisecond)
	c.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
		c.cmd.Process.Kill()
		<-c.done
	}
	return ReadPcap(c.File)
}

// Packet is a TCP segment over IPv4 read from a pcap file.
type Packet struct {
	Src, Dst netip.AddrPort
	// Flags are the TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
	Flags   uint8
	Payload []byte
}

// TCP flags.
const (
	FIN = 0x01
	SYN = 0x02
	RST = 0x04
	ACK = 0x10
)

func (p Packet) String() string {
	return fmt.Sprintf("%s > %s flags=%#x len=%d", p.Src, p.Dst, p.Flags, len(p.Payload))
}

// ReadPcap reads an Ethernet pcap file (as tcpdump -w writes it) and returns
// its TCP/IPv4 packets, skipping everything else.
func ReadPcap(path string) ([]Packet, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read pcap: %w", err)
	}
	defer f.Close()
	r := bufio.NewReader(f)
	var gh [24]byte
	if _, err := io.ReadFull(r, gh[:]); err != nil {
		return nil, fmt.Errorf("read pcap %s: header: %w", path, err)
	}
	var bo binary.ByteOrder
	switch binary.LittleEndian.Uint32(gh[:4]) {
	case 0xa1b2c3d4, 0xa1b23c4d:
		bo = binary.LittleEndian
	case 0xd4c3b2a1, 0x4d3cb2a1:
		bo = binary.BigEndian
	default:
		return nil, fmt.Errorf("read pcap %s: not a pcap file", path)
	}
	if lt := bo.Uint32(gh[20:24]); lt != 1 {
		return nil, fmt.Errorf("read pcap %s: link type %d, want Ethernet", path, lt)
	}
	var pkts []Packet
	for {
		var rh [16]byte
		if _, err := io.ReadFull(r, rh[:]); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return pkts, nil // a truncated last record is tcpdump being stopped
			}
			return nil, fmt.Errorf("read pcap %s: %w", path, err)
		}
		data := make([]byte, bo.Uint32(rh[8:12]))
		if _, err := io.ReadFull(r, data); err != nil {
			return pkts, nil
		}
		if p, ok := parseEthernet(data); ok {
			pkts = append(pkts, p)
		}
	}
}

func parseEthernet(b []byte) (Packet, bool) {
	if len(b) < 14+20 || binary.BigEndian.Uint16(b[12:14]) != 0x0800 {
		return Packet{}, false
	}
	ip := b[14:]
	ihl := int(ip[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(ip[2:4]))
	if ip[0]>>4 != 4 || ip[9] != 6 || ihl < 20 || total > len(ip) || total < ihl+20 {
		return Packet{}, false
	}
	tcp := ip[ihl:total]
	doff := int(tcp[12]>>4) * 4
	if doff < 20 || doff > len(tcp) {
		return Packet{}, false
	}
	src := netip.AddrFrom4([4]byte(ip[12:16]))
	dst := netip.AddrFrom4([4]byte(ip[16:20]))
	return Packet{
		Src:     netip.AddrPortFrom(src, binary.BigEndian.Uint16(tcp[0:2])),
		Dst:     netip.AddrPortFrom(dst, binary.BigEndian.Uint16(tcp[2:4])),
		Flags:   tcp[13],
		Payload: tcp[doff:],
	}, true
}
