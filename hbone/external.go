package hbone

import (
	"net"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Transports a Stream can run over.
const (
	TransportH2 = "h2" // this package: HTTP/2 over TLS over TCP
	TransportH3 = "h3" // HTTP/3 over QUIC (package hbone/h3)
)

// Tunnel is a tunnelled connection of another transport (HTTP/3 over
// QUIC): a net.Conn whose CloseWrite half-closes and whose Peer is the
// other side's verified identity. WrapStream turns it into a Stream, so
// that callers see one type whatever the transport.
type Tunnel interface {
	net.Conn
	CloseWrite() error
	Peer() spiffeid.ID
}

// Answerer answers a CONNECT request that another transport received
// (NewRequest): Accept sends 200 and returns the tunnel, Reject sends
// status and ends the stream.
type Answerer interface {
	Accept() (Tunnel, error)
	Reject(status int) error
}

// WrapStream returns t as a Stream whose Transport is transport.
func WrapStream(t Tunnel, transport string) *Stream {
	return &Stream{ext: t, transport: transport}
}

// NewRequest returns a Request that another transport received, with r's
// exported fields; its Accept and Reject answer through a, and Accept's
// Stream has the given transport. A Handler serves it as any other.
func NewRequest(r Request, a Answerer, transport string) *Request {
	r.st, r.answered = nil, false
	r.ext, r.transport = a, transport
	return &r
}

// Transport names the transport a Stream runs over: TransportH2 for this
// package's streams, else what WrapStream was given.
func (st *Stream) Transport() string {
	if st.ext != nil {
		return st.transport
	}
	return TransportH2
}

// acceptExt and rejectExt answer a request of another transport.
func (r *Request) acceptExt() (*Stream, error) {
	t, err := r.ext.Accept()
	if err != nil {
		return nil, err
	}
	return WrapStream(t, r.transport), nil
}
