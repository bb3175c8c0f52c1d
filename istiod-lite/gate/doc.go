// Package gate is the admission of istiod-lite's gRPC port (15012): what a
// connection or a call must get past before the services (xDS, the
// certificate service) spend memory on it.
//
//   - Listener caps open connections per source IP and in total; a
//     connection over a cap is closed at once, before its TLS handshake.
//   - Creds wraps the server's TLS credentials: every connection is read
//     through an HTTP/2 frame guard that gives the calls of chosen methods
//     (the certificate service's) their own request size limit, far below
//     the server-wide one xDS needs: a call that sends more is the end of its
//     connection, before the body reaches gRPC.
//   - Tap (grpc.InTapHandle) runs when a call's headers arrive, before its
//     stream exists: it refuses a source over its call rate, a call without
//     a bearer token, and a token its Authenticator refuses (an
//     auth.Cache in cluster mode: a token costs one TokenReview, a refused
//     one is refused from memory), and puts the authenticated caller in the
//     call's context (auth.NewContext) for the services. While it checks a
//     token, gRPC reads nothing more from that connection, so an
//     unauthenticated call's body is never buffered.
//
// Refusals go to an auth.RefusalLog: a flood writes a few lines and a count.
// Together with grpc.MaxConcurrentStreams (calls per connection) the caps
// bound calls per source and in total.
package gate
