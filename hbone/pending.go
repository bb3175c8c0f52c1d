package hbone

import (
	"container/heap"
	"container/list"
	"net"
	"net/netip"
	"sync"
	"time"
)

// pendingSet tracks accepted connections whose handshake (TLS, HTTP/2
// preface) is not done: each holds a goroutine and a file descriptor, so
// unauthenticated peers could pile them up. It bounds them per source and
// in total, and shortens their deadline once more than half of the total
// is in use. Past the per-source bound the source's own oldest connection
// is closed; past the total bound the oldest connection of the heaviest
// source (the one with the most pending connections) is closed, so a flood
// from one source sheds itself, not the few connections of others. A
// source is an IPv4 address, or the /64 of an IPv6 address (one host
// usually holds a whole /64 and can pick any address in it).
type pendingSet struct {
	max, perSource  int
	timeout, loaded time.Duration

	// mu guards the fields below.
	mu       sync.Mutex
	all      list.List // of *pendingConn, oldest first
	bySource map[netip.Addr]*sourceQueue
	heaviest sourceHeap // the sources of bySource, heaviest first
	seq      uint64     // numbers pendingConns in arrival order
	shed     int        // connections closed to make room (for tests and logs)
	long     int        // pending connections whose deadline is not shortened yet
}

type pendingConn struct {
	nc       net.Conn
	src      netip.Addr // sourceKey of the peer's address
	seq      uint64
	all, per *list.Element // nil once removed
	short    bool          // its deadline is the loaded one
}

// sourceQueue is one source's pending connections, oldest first, and its
// place in the heap.
type sourceQueue struct {
	key   netip.Addr
	conns list.List // of *pendingConn
	index int       // in pendingSet.heaviest
}

// sourceHeap orders sources by their pending connections, most first; of
// equally heavy ones, the one whose oldest connection is oldest first.
type sourceHeap []*sourceQueue

func (h sourceHeap) Len() int { return len(h) }
func (h sourceHeap) Less(i, j int) bool {
	a, b := h[i], h[j]
	if a.conns.Len() != b.conns.Len() {
		return a.conns.Len() > b.conns.Len()
	}
	return a.conns.Front().Value.(*pendingConn).seq < b.conns.Front().Value.(*pendingConn).seq
}
func (h sourceHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *sourceHeap) Push(x any) {
	q := x.(*sourceQueue)
	q.index = len(*h)
	*h = append(*h, q)
}
func (h *sourceHeap) Pop() any {
	old := *h
	q := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	q.index = -1
	return q
}

// sourceKey is the source a peer address counts against: the address for
// IPv4 (and v4-mapped IPv6), its /64 for IPv6.
func sourceKey(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.WithZone("").Prefix(64)
		return p.Addr()
	}
	return a
}

// add registers nc, from the peer address src, closing pending connections
// if a bound is reached (its source's oldest past the per-source bound; the
// heaviest source's oldest past the total), and sets nc's handshake
// deadline. It returns the entry to remove when the handshake is done.
func (p *pendingSet) add(nc net.Conn, src netip.Addr) *pendingConn {
	p.mu.Lock()
	if p.bySource == nil {
		p.bySource = make(map[netip.Addr]*sourceQueue)
	}
	p.seq++
	pc := &pendingConn{nc: nc, src: sourceKey(src), seq: p.seq}
	var shed []net.Conn
	if q := p.bySource[pc.src]; q != nil {
		for q.conns.Len() > 0 && q.conns.Len() >= p.perSource {
			shed = append(shed, p.removeLocked(q.conns.Front().Value.(*pendingConn)))
		}
	}
	q := p.bySource[pc.src] // again: shedding may have emptied and dropped it
	if q == nil {
		q = &sourceQueue{key: pc.src}
		p.bySource[pc.src] = q
		pc.per = q.conns.PushBack(pc)
		heap.Push(&p.heaviest, q)
	} else {
		pc.per = q.conns.PushBack(pc)
		heap.Fix(&p.heaviest, q.index)
	}
	pc.all = p.all.PushBack(pc)
	for p.all.Len() > max(p.max, 1) {
		top := p.heaviest[0]
		shed = append(shed, p.removeLocked(top.conns.Front().Value.(*pendingConn)))
	}
	p.shed += len(shed)
	p.long++
	now := time.Now()
	if p.all.Len() > p.max/2 && p.long > 0 {
		// Under load: this one and every pending one get the short
		// deadline (each is shortened once).
		for e := p.all.Front(); e != nil; e = e.Next() {
			if q := e.Value.(*pendingConn); !q.short {
				q.short = true
				p.long--
				if q != pc {
					q.nc.SetDeadline(now.Add(p.loaded))
				}
			}
		}
	}
	if pc.short {
		nc.SetDeadline(now.Add(p.loaded))
	} else {
		nc.SetDeadline(now.Add(p.timeout))
	}
	p.mu.Unlock()
	for _, c := range shed {
		c.Close() // its handshake fails; its goroutine removes nothing
	}
	return pc
}

// remove forgets pc (handshake done or failed).
func (p *pendingSet) remove(pc *pendingConn) {
	p.mu.Lock()
	p.removeLocked(pc)
	p.mu.Unlock()
}

// removeLocked unlinks pc and returns its connection. p.mu must be held.
func (p *pendingSet) removeLocked(pc *pendingConn) net.Conn {
	if pc.all == nil {
		return pc.nc
	}
	p.all.Remove(pc.all)
	q := p.bySource[pc.src]
	q.conns.Remove(pc.per)
	if q.conns.Len() == 0 {
		delete(p.bySource, pc.src)
		heap.Remove(&p.heaviest, q.index)
	} else {
		heap.Fix(&p.heaviest, q.index)
	}
	pc.all, pc.per = nil, nil
	if !pc.short {
		p.long--
	}
	return pc.nc
}

// counts returns the pending connections and how many were shed.
func (p *pendingSet) counts() (pending, shed int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.all.Len(), p.shed
}

// sourceCounts returns the pending connections by source (sourceKey).
func (p *pendingSet) sourceCounts() map[netip.Addr]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[netip.Addr]int, len(p.bySource))
	for k, q := range p.bySource {
		out[k] = q.conns.Len()
	}
	return out
}
