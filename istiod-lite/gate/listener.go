package gate

import (
	"net"
	"net/netip"
	"sync"
)

// Defaults of Listener.
const (
	DefaultConnsPerSource = 32
	DefaultConns          = 4096
)

// Reasons a Listener gives Refused.
const (
	ReasonTotal     = "too many connections"
	ReasonPerSource = "too many connections from this source"
)

// Listener caps the open connections it accepts, per source IP and in
// total. A connection over a cap is closed as soon as it is accepted (the
// client sees a reset or EOF) and recorded in Refusals. The zero value with
// Listener set is usable.
type Listener struct {
	net.Listener
	// PerSource caps one source IP's open connections
	// (DefaultConnsPerSource if zero).
	PerSource int
	// Total caps all open connections (DefaultConns if zero).
	Total int
	// Refused, if set, is called for each connection closed over a cap.
	Refused func(source, reason string)

	mu    sync.Mutex // guards open and total
	open  map[netip.Addr]int
	total int
}

// Accept returns the next connection within the caps.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		src := sourceOf(c.RemoteAddr())
		if reason := l.admit(src); reason != "" {
			c.Close()
			if l.Refused != nil {
				l.Refused(src.String(), reason)
			}
			continue
		}
		return &conn{Conn: c, release: sync.OnceFunc(func() { l.release(src) })}, nil
	}
}

// Open returns the open connections of source src and in total.
func (l *Listener) Open(src netip.Addr) (fromSource, total int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open[src], l.total
}

func (l *Listener) admit(src netip.Addr) string {
	per, total := l.PerSource, l.Total
	if per <= 0 {
		per = DefaultConnsPerSource
	}
	if total <= 0 {
		total = DefaultConns
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.total >= total:
		return ReasonTotal
	case l.open[src] >= per:
		return ReasonPerSource
	}
	if l.open == nil {
		l.open = map[netip.Addr]int{}
	}
	l.open[src]++
	l.total++
	return ""
}

func (l *Listener) release(src netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if l.open[src]--; l.open[src] <= 0 {
		delete(l.open, src)
	}
}

// conn releases its place in the caps once, when closed.
type conn struct {
	net.Conn
	release func()
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.release()
	return err
}

// sourceOf is addr's IP (IPv4-mapped IPv6 unmapped); the zero Addr if
// addr has none.
func sourceOf(addr net.Addr) netip.Addr {
	if ta, ok := addr.(*net.TCPAddr); ok {
		ip, _ := netip.AddrFromSlice(ta.IP)
		return ip.Unmap()
	}
	if ap, err := netip.ParseAddrPort(addr.String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}
