package ztunnel

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/ambit-mesh/ambit/model"
)

// SOCKS5 (RFC 1928), CONNECT without authentication, for hosts without
// eBPF: the requested destination is the original destination of an
// outbound connection from the workload that owns the client's address.

const (
	socksVersion = 5

	socksNoAuth       = 0x00
	socksNoAcceptable = 0xff

	socksConnect = 0x01

	socksIPv4   = 0x01
	socksDomain = 0x03
	socksIPv6   = 0x04

	socksSucceeded          = 0x00
	socksGeneralFailure     = 0x01
	socksNotAllowed         = 0x02
	socksHostUnreachable    = 0x04
	socksConnRefused        = 0x05
	socksCmdNotSupported    = 0x07
	socksAddrTypeNotSupport = 0x08
)

// socksHandshakeTimeout bounds the greeting and the request.
const socksHandshakeTimeout = 10 * time.Second

// errSOCKS is a malformed or unsupported request; rep is the reply code.
type errSOCKS struct {
	rep byte
	msg string
}

func (e *errSOCKS) Error() string { return "socks5: " + e.msg }

func (p *Proxy) serveSOCKS5(ctx context.Context, client net.Conn) {
	src := addrPort(client.RemoteAddr())
	client.SetDeadline(time.Now().Add(socksHandshakeTimeout))
	br := bufio.NewReaderSize(client, 512)
	dst, err := readSOCKSRequest(br, client, p.cfg.Store.Load())
	if err != nil {
		var se *errSOCKS
		if errors.As(err, &se) {
			writeSOCKSReply(client, se.rep)
		}
		c, _ := p.begin(ctx, dirOutbound, ListenerSOCKS5, src, netip.AddrPort{})
		reset(client)
		p.end(c, flagBadSOCKS5, "bad socks5 request", err)
		return
	}
	client.SetDeadline(time.Time{})
	if br.Buffered() > 0 {
		// The client sent data before our reply: keep it.
		client = &prefixConn{Conn: client, r: io.MultiReader(io.LimitReader(br, int64(br.Buffered())), client)}
	}
	p.outbound(ctx, client, ListenerSOCKS5, src, dst, func(flags string) error {
		rep := byte(socksSucceeded)
		switch flags {
		case flagNone:
		case flagDeny, flagNoSource:
			rep = socksNotAllowed
		case flagNoRoute:
			rep = socksHostUnreachable
		case flagConnect:
			rep = socksConnRefused
		default:
			rep = socksGeneralFailure
		}
		return writeSOCKSReply(client, rep)
	})
}

// readSOCKSRequest reads the greeting (answering it) and the CONNECT
// request, and returns the requested destination.
func readSOCKSRequest(br *bufio.Reader, w io.Writer, snap *model.Snapshot) (netip.AddrPort, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("socks5: read greeting: %w", err)
	}
	if hdr[0] != socksVersion {
		return netip.AddrPort{}, fmt.Errorf("socks5: version %d", hdr[0])
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(br, methods); err != nil {
		return netip.AddrPort{}, fmt.Errorf("socks5: read methods: %w", err)
	}
	if !strings.ContainsRune(string(methods), socksNoAuth) {
		w.Write([]byte{socksVersion, socksNoAcceptable})
		return netip.AddrPort{}, errors.New("socks5: client does not offer no-authentication")
	}
	if _, err := w.Write([]byte{socksVersion, socksNoAuth}); err != nil {
		return netip.AddrPort{}, fmt.Errorf("socks5: write method: %w", err)
	}
	var req [4]byte
	if _, err := io.ReadFull(br, req[:]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("socks5: read request: %w", err)
	}
	if req[0] != socksVersion {
		return netip.AddrPort{}, fmt.Errorf("socks5: request version %d", req[0])
	}
	var addr netip.Addr
	switch req[3] {
	case socksIPv4, socksIPv6:
		b := make([]byte, 4)
		if req[3] == socksIPv6 {
			b = make([]byte, 16)
		}
		if _, err := io.ReadFull(br, b); err != nil {
			return netip.AddrPort{}, fmt.Errorf("socks5: read address: %w", err)
		}
		addr, _ = netip.AddrFromSlice(b)
	case socksDomain:
		n, err := br.ReadByte()
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("socks5: read name length: %w", err)
		}
		name := make([]byte, n)
		if _, err := io.ReadFull(br, name); err != nil {
			return netip.AddrPort{}, fmt.Errorf("socks5: read name: %w", err)
		}
		var port [2]byte
		if _, err := io.ReadFull(br, port[:]); err != nil {
			return netip.AddrPort{}, fmt.Errorf("socks5: read port: %w", err)
		}
		if req[1] != socksConnect {
			return netip.AddrPort{}, &errSOCKS{socksCmdNotSupported, fmt.Sprintf("command %d not supported", req[1])}
		}
		a, ok := lookupHost(snap, string(name))
		if !ok {
			return netip.AddrPort{}, &errSOCKS{socksHostUnreachable, fmt.Sprintf("unknown host %q", name)}
		}
		return netip.AddrPortFrom(a, binary.BigEndian.Uint16(port[:])), nil
	default:
		return netip.AddrPort{}, &errSOCKS{socksAddrTypeNotSupport, fmt.Sprintf("address type %d not supported", req[3])}
	}
	var port [2]byte
	if _, err := io.ReadFull(br, port[:]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("socks5: read port: %w", err)
	}
	if req[1] != socksConnect {
		return netip.AddrPort{}, &errSOCKS{socksCmdNotSupported, fmt.Sprintf("command %d not supported", req[1])}
	}
	return netip.AddrPortFrom(addr.Unmap(), binary.BigEndian.Uint16(port[:])), nil
}

// lookupHost resolves name against the model's service hostnames
// ("<name>.<namespace>.svc.cluster.local", also "<name>.<namespace>" and
// "<name>.<namespace>.svc"), or parses it as an address literal.
func lookupHost(snap *model.Snapshot, name string) (netip.Addr, bool) {
	name = strings.TrimSuffix(strings.ToLower(name), ".")
	if a, err := netip.ParseAddr(name); err == nil {
		return a.Unmap(), true
	}
	var best *model.Service
	for _, s := range snap.Services {
		if len(s.VIPs) == 0 {
			continue
		}
		short := s.Name + "." + s.Namespace
		if name == strings.ToLower(s.Hostname) || name == short || name == short+".svc" {
			if best == nil || s.Key() < best.Key() {
				best = s
			}
		}
	}
	if best == nil {
		return netip.Addr{}, false
	}
	return best.VIPs[0], true
}

// writeSOCKSReply answers a request; the bound address is left zero.
func writeSOCKSReply(w io.Writer, rep byte) error {
	_, err := w.Write([]byte{socksVersion, rep, 0, socksIPv4, 0, 0, 0, 0, 0, 0})
	return err
}

// prefixConn is a connection whose first bytes were already buffered.
type prefixConn struct {
	net.Conn
	r io.Reader
}

func (c *prefixConn) Read(b []byte) (int, error) { return c.r.Read(b) }

// CloseWrite half-closes the underlying connection.
func (c *prefixConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}
