package waypoint

import (
	"net"
	"sync"
	"time"
)

// lazyReadDeadline passes a connection's read deadline on to it only once
// the deadline has passed. net/http's server sets a read deadline in the
// future at every request (ReadHeaderTimeout, the route's ReadTimeout) and
// clears it once the head is read; on an HBONE stream each such deadline
// is a new timer and a wake-up under the tunnel's lock. Here one timer per
// connection, reset, stands in for them, and a deadline that passes is
// given to the connection as one in the past (a blocked Read fails at
// once, as it would have).
type lazyReadDeadline struct {
	conn net.Conn

	mu      sync.Mutex // guards the fields below
	at      time.Time  // the deadline set (zero: none)
	applied bool       // conn has a deadline in the past
	timer   *time.Timer
}

func (d *lazyReadDeadline) set(t time.Time) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.at = t
	if d.timer != nil {
		d.timer.Stop()
	}
	if t.IsZero() {
		if !d.applied {
			return nil
		}
		d.applied = false
		return d.conn.SetReadDeadline(t)
	}
	if !time.Now().Before(t) { // passed already
		d.applied = true
		return d.conn.SetReadDeadline(t)
	}
	if d.applied {
		d.applied = false
		if err := d.conn.SetReadDeadline(time.Time{}); err != nil {
			return err
		}
	}
	if d.timer == nil {
		d.timer = time.AfterFunc(time.Until(t), d.fire)
	} else {
		d.timer.Reset(time.Until(t))
	}
	return nil
}

// fire runs on the timer: the deadline passed (or moved since: then the
// timer is set again).
func (d *lazyReadDeadline) fire() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.at.IsZero() || d.applied {
		return
	}
	if rem := time.Until(d.at); rem > 0 {
		d.timer.Reset(rem)
		return
	}
	d.applied = true
	d.conn.SetReadDeadline(aLongTimeAgo)
}

// stop releases the timer (the connection is done).
func (d *lazyReadDeadline) stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.at = time.Time{}
	if d.timer != nil {
		d.timer.Stop()
	}
}
