package hbone

import (
	"container/list"
	"net"
	"net/netip"
	"sync"
	"time"
)

// pendingSet tracks accepted connections whose handshake (TLS, HTTP/2
// preface) is not done: each holds a goroutine and a file descriptor, so
// unauthenticated peers could pile them up. It bounds them per source IP
// and in total by closing the oldest, and shortens their deadline once more
// than half of the total is in use.
type pendingSet struct {
	max, perSource  int
	timeout, loaded time.Duration

	// mu guards the fields below.
	mu       sync.Mutex
	all      list.List // of *pendingConn, oldest first
	bySource map[netip.Addr]*list.List
	shed     int // connections closed to make room (for tests and logs)
	long     int // pending connections whose deadline is not shortened yet
}

type pendingConn struct {
	nc       net.Conn
	src      netip.Addr
	all, per *list.Element // nil once removed
	short    bool          // its deadline is the loaded one
}

// add registers nc, closing the oldest pending connections of its source
// or of all sources if a bound is reached, and sets nc's handshake
// deadline. It returns the entry to remove when the handshake is done.
func (p *pendingSet) add(nc net.Conn, src netip.Addr) *pendingConn {
	pc := &pendingConn{nc: nc, src: src}
	var shed []net.Conn
	p.mu.Lock()
	if p.bySource == nil {
		p.bySource = make(map[netip.Addr]*list.List)
	}
	per := p.bySource[src]
	if per == nil {
		per = new(list.List)
		p.bySource[src] = per
	}
	for per.Len() >= p.perSource {
		shed = append(shed, p.removeLocked(per.Front().Value.(*pendingConn)))
	}
	for p.all.Len() >= p.max {
		shed = append(shed, p.removeLocked(p.all.Front().Value.(*pendingConn)))
	}
	p.shed += len(shed)
	p.bySource[src] = per // again, if shedding emptied and dropped it
	pc.all = p.all.PushBack(pc)
	pc.per = per.PushBack(pc)
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
	per := p.bySource[pc.src]
	per.Remove(pc.per)
	if per.Len() == 0 {
		delete(p.bySource, pc.src)
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
