package ztunnel

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// listen opens a TCP listener, with IP_TRANSPARENT when transparent is set
// and the socket mark mark (when non-zero): the accepted connections
// inherit it, so their packets to a pod carry it like the proxy's own
// dials (the capture lets the proxy's marked packets reach pods directly).
func listen(ctx context.Context, addr string, transparent bool, mark uint32) (net.Listener, error) {
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	if transparent || mark != 0 {
		lc.Control = func(network, address string, c syscall.RawConn) error {
			return control(c, network, transparent, mark)
		}
	}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return ln, nil
}

// dialer returns a net.Dialer that marks its sockets with mark (when
// non-zero) and, when src is valid, binds to src with IP_TRANSPARENT so that
// a foreign (non-local) source address is allowed.
func dialer(src netip.Addr, mark uint32) *net.Dialer {
	d := &net.Dialer{}
	d.SetMultipathTCP(false)
	transparent := src.IsValid()
	if transparent {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src.Unmap(), 0))
	}
	if transparent || mark != 0 {
		d.Control = func(network, address string, c syscall.RawConn) error {
			return control(c, network, transparent, mark)
		}
	}
	return d
}

func control(c syscall.RawConn, network string, transparent bool, mark uint32) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if transparent {
			if network == "tcp6" {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
				if serr != nil {
					return
				}
			}
			// Dual-stack sockets need the IPv4 option too; IPv6-only
			// sockets may refuse it, which is harmless.
			if e := unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1); e != nil && network != "tcp6" {
				serr = fmt.Errorf("set IP_TRANSPARENT: %w", e)
				return
			}
		}
		if mark != 0 {
			if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark)); e != nil {
				serr = fmt.Errorf("set SO_MARK: %w", e)
			}
		}
	})
	if err != nil {
		return err
	}
	return serr
}
