// Package h3 is HBONE over HTTP/3: the same tunnel as package hbone, CONNECT
// streams between SPIFFE workload identities, carried by QUIC
// (github.com/quic-go/quic-go) on UDP <pod IP>:15008 instead of HTTP/2 over
// TLS over TCP. Its Dialer and Server mirror hbone's and hand out the same
// types: Dial returns an *hbone.Stream (Transport() == "h3") and the Server
// gives its Handler *hbone.Request values, so ztunnel's inbound and outbound
// code (policy, 401/503 answers, relay) is the same for both transports.
//
// On the wire: QUIC v1, TLS 1.3 only, ALPN "h3", no SNI, both sides
// presenting X.509-SVIDs (the client: one of the allowed destination
// identities; the server: a client of its own trust domain). Each tunnelled
// connection is one HTTP/3 request stream: a plain CONNECT with
// :authority <pod IP>:<port> and hbone's forwarded, baggage and traceparent
// headers; the server answers 200 once its upstream connected, 401 when
// policy denies, 503 when the upstream fails or nothing local owns the
// address, 400 for a non-CONNECT (or extended CONNECT) request or an
// authority that differs from the destination address (unless that is its
// waypoint), 431 for headers over MaxHeaderBytes. Closing the write side
// sends FIN: the peer reads io.EOF and may go on writing.
//
// Connections are pooled per (source identity, allowed peer identities,
// address), up to MaxStreamsPerConn streams each; windows are hbone's
// (4 MiB per stream, 16 MiB per connection, fixed); a PING goes out after
// KeepAlive of silence and a connection silent for twice that is gone;
// one without streams for IdleTimeout is closed. Shutdown sends GOAWAY and
// waits for open streams.
//
// Two traps of TLS over QUIC are closed here. Session resumption: crypto/tls
// does not call VerifyPeerCertificate on a resumed session, which is where
// go-spiffe checks the peer, so both sides verify the peer's SVID (chain,
// validity now, trust domain, allowed IDs) in VerifyConnection, which runs on
// every handshake; and each pool key has its own session cache (crypto/tls
// keys a QUIC client's sessions by server name, and HBONE sends none).
// Early data: 0-RTT is off on both sides (Dial, not DialEarly; Listen, not
// ListenEarly), so no request is processed before the handshake completes
// and nothing can be replayed.
//
// Fallback puts the two together: HTTP/3 where the destination advertises
// it, HTTP/2 after a QUIC dial that got no answer (remembered for
// RetryAfter), never anything in clear; ztunnel uses it with --hbone-quic.
//
// When to turn it on (numbers from 2 shared, heavily loaded cores, so
// indications: go test -bench . ./hbone/h3 and
// go test -tags integration -run TestQUICDelayLine -v ./integration):
// on loopback one HTTP/3 stream moves 90-150 MB/s against 300-580 MB/s
// for HTTP/2, at 5.0-5.9 CPU-seconds per GB against 1.1-1.4 (both ends,
// 4-5x), and a 1 KiB request takes 36-56 µs against 13-20 µs. A new tunnel
// costs 2 round trips instead of 3: across a 10 ms line 65 ms against
// 87-113 ms. So: off inside a zone or a cluster, where round trips are
// short and CPU is what a tunnel costs; on for links with tens of
// milliseconds of round trip where connections are short-lived (new
// tunnels dominate), between zones, regions or to VMs, after measuring.
// quic-go's throughput under 1% loss was not better than TCP's here.
// make bench's quic path agrees through the real ztunnels and their eBPF
// capture (bench/quic.go; a -short run at load 10 on 2 cores): across a
// 10 ms line a new tunnel took 45 ms against 66, requests the same, but
// one stream moved 0.11 Gbit/s against 0.92 at 15.5 CPU-seconds per GB
// against 3.3.
//
// A workload advertises QUIC with the label ambit.dev/hbone-quic=enabled on
// its pod, its namespace or its Node (istiod-lite's workload hbone_quic);
// the pod's label, then the namespace's, decide before the node's, so
// "disabled" there opts out of a node's advertisement.
package h3
