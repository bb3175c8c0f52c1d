package h3

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/hbone"
)

// rawStream is what the client's *http3.RequestStream and the server's
// *http3.Stream have in common: DATA frames in and out, Close sends FIN.
type rawStream interface {
	io.ReadWriter
	Close() error
	CancelRead(quic.StreamErrorCode)
	CancelWrite(quic.StreamErrorCode)
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// tunnel is one CONNECT stream used as a connection (hbone.Tunnel):
// CloseWrite sends FIN (the peer reads io.EOF); Close ends cleanly when both
// directions ended (or sends FIN when only ours is left), else resets what
// is still open, as closing a TCP socket with unread data does.
type tunnel struct {
	str           rawStream
	peer          spiffeid.ID
	local, remote net.Addr
	release       func() // gives the stream's slot back; called once, by Close

	mu      sync.Mutex // guards the fields below
	rEOF    bool       // the peer's FIN was read
	wClosed bool       // our FIN was sent
	closed  bool
}

var errWriteClosed = errors.New("h3: write after CloseWrite")

func (t *tunnel) Read(p []byte) (int, error) {
	n, err := t.str.Read(p)
	if err == io.EOF {
		t.mu.Lock()
		t.rEOF = true
		t.mu.Unlock()
	}
	return n, err
}

func (t *tunnel) Write(p []byte) (int, error) {
	t.mu.Lock()
	wc := t.wClosed
	t.mu.Unlock()
	if wc {
		return 0, errWriteClosed
	}
	return t.str.Write(p)
}

func (t *tunnel) CloseWrite() error {
	t.mu.Lock()
	if t.wClosed || t.closed {
		t.mu.Unlock()
		return nil
	}
	t.wClosed = true
	t.mu.Unlock()
	return t.str.Close()
}

func (t *tunnel) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	rEOF, wClosed := t.rEOF, t.wClosed
	t.wClosed = true
	t.mu.Unlock()
	switch {
	case wClosed:
	case rEOF:
		t.str.Close()
	default:
		t.str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
	}
	if !rEOF {
		t.str.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
	}
	if t.release != nil {
		t.release()
	}
	return nil
}

func (t *tunnel) Peer() spiffeid.ID    { return t.peer }
func (t *tunnel) LocalAddr() net.Addr  { return t.local }
func (t *tunnel) RemoteAddr() net.Addr { return t.remote }

func (t *tunnel) SetDeadline(d time.Time) error {
	t.str.SetReadDeadline(d)
	return t.str.SetWriteDeadline(d)
}
func (t *tunnel) SetReadDeadline(d time.Time) error  { return t.str.SetReadDeadline(d) }
func (t *tunnel) SetWriteDeadline(d time.Time) error { return t.str.SetWriteDeadline(d) }

var _ hbone.Tunnel = (*tunnel)(nil)
