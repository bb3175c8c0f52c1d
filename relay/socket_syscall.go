//go:build unix && (race || !linux)

package relay

import "syscall"

// rawRead is read(2) through the syscall package: under the race detector
// (which it tells about the buffer and the socket's happens-before edge),
// and off Linux.
func rawRead(fd uintptr, p []byte) (int, syscall.Errno) {
	n, err := syscall.Read(int(fd), p)
	if err != nil {
		errno, _ := err.(syscall.Errno)
		return 0, errno
	}
	return n, 0
}

// rawWrite is write(2) through the syscall package (see rawRead).
func rawWrite(fd uintptr, p []byte) (int, syscall.Errno) {
	n, err := syscall.Write(int(fd), p)
	if err != nil {
		errno, _ := err.(syscall.Errno)
		return 0, errno
	}
	return n, 0
}
