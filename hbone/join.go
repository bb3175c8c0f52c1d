package hbone

import (
	"context"
	"net"

	"github.com/ambit-mesh/ambit/relay"
)

// closeWriter is a connection that can half-close (TCP, TLS, Stream).
type closeWriter interface{ CloseWrite() error }

// Join copies a->b and b->a concurrently with half-close, closes both and
// returns the bytes copied each way: relay.Join without a byte hook (see
// there). A handler that counts bytes as they move calls relay.Join.
func Join(ctx context.Context, a, b net.Conn) (aToB, bToA int64, err error) {
	return relay.Join(ctx, a, b, nil)
}
