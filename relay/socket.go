package relay

import (
	"io"
	"net"
	"os"
	"syscall"
)

// Socket reads and writes a TCP socket as its net.Conn does (the same
// poller, deadlines and errors), but makes the read(2) and write(2) calls
// itself through its syscall.RawConn, as raw system calls: on a
// non-blocking socket they never block, so the runtime need not account
// for them. The runtime's own accounting (entersyscall) wakes its monitor
// thread (sysmon) out of its sleep on the first system call after the
// process was idle; a proxy at a moderate request rate is idle between
// requests, so every request paid a futex wake-up, sysmon's sleeps
// (nanosleep) while the request ran, and its futex wait after it. At 1000
// req/s on one connection sysmon alone was 13-14% of a ztunnel's CPU, and
// without it (and its futexes and context switches) a ztunnel's CPU per
// request about halved (perf: bench/README.md). The cost: while raw calls
// are a process's only activity, sysmon sleeps on, so its 10 ms
// preemption of a goroutine that computes without a system call and its
// network poll when every P is busy wait for the next timer or accounted
// system call; the data path's goroutines park after microseconds, and
// the GC preempts by itself. Under the race detector it uses
// the syscall package's calls (they tell the detector about the memory
// and the happens-before edge a socket carries).
//
// One Read at a time and one Write at a time; Read and Write may run
// concurrently.
type Socket struct {
	rc syscall.RawConn

	// Read's state, set by Read and used by its callback.
	readFn func(fd uintptr) bool
	rp     []byte
	rn     int
	rerr   error

	// Write's state.
	writeFn func(fd uintptr) bool
	wp      []byte
	wn      int
	werr    error
}

// NewSocket returns a Socket on c, or nil if c is not a TCP connection.
func NewSocket(c net.Conn) *Socket {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	s := &Socket{rc: rc}
	s.readFn = s.readFD
	s.writeFn = s.writeFD
	return s
}

// Read reads up to len(p) bytes, waiting for the poller while there are
// none: io.EOF at the end of the stream, as net.Conn's Read.
func (s *Socket) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.rp, s.rn, s.rerr = p, 0, nil
	err := s.rc.Read(s.readFn)
	n, rerr := s.rn, s.rerr
	s.rp, s.rerr = nil, nil
	if err != nil { // closed, deadline: the poller's error
		return 0, err
	}
	return n, rerr
}

func (s *Socket) readFD(fd uintptr) bool {
	for {
		n, errno := rawRead(fd, s.rp)
		switch {
		case errno == syscall.EINTR:
			continue
		case errno == syscall.EAGAIN:
			return false // wait for the poller
		case errno != 0:
			s.rerr = os.NewSyscallError("read", errno)
		case n == 0:
			s.rerr = io.EOF
		default:
			s.rn = n
		}
		return true
	}
}

// Write writes all of p, waiting for the poller while the socket is full.
func (s *Socket) Write(p []byte) (int, error) {
	s.wp, s.wn, s.werr = p, 0, nil
	err := s.rc.Write(s.writeFn)
	n, werr := s.wn, s.werr
	s.wp, s.werr = nil, nil
	if werr == nil {
		werr = err
	}
	return n, werr
}

func (s *Socket) writeFD(fd uintptr) bool {
	for len(s.wp) > 0 {
		n, errno := rawWrite(fd, s.wp)
		if n > 0 {
			s.wn += n
			s.wp = s.wp[n:]
		}
		switch errno {
		case 0:
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false // wait for the poller
		default:
			s.werr = os.NewSyscallError("write", errno)
			return true
		}
	}
	return true
}

// WriteNow writes what the socket takes of p at once, without waiting:
// the bytes written, and an error other than EAGAIN. It is for a caller
// that must not block (a read loop delivering to a socket), already inside
// a RawConn.Write callback on fd.
func WriteNow(fd uintptr, p []byte) (int, error) {
	wn := 0
	for len(p) > 0 {
		n, errno := rawWrite(fd, p)
		if n > 0 {
			wn += n
			p = p[n:]
		}
		switch errno {
		case 0, syscall.EINTR:
		case syscall.EAGAIN:
			return wn, nil
		default:
			return wn, os.NewSyscallError("write", errno)
		}
	}
	return wn, nil
}
