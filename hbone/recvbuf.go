package hbone

import "sync"

// recvChunkSize is the size of the pooled chunks that hold a stream's
// received, unread bytes.
const recvChunkSize = 64 << 10

var recvChunks = sync.Pool{New: func() any { b := make([]byte, 0, recvChunkSize); return &b }}

// recvBuf is a FIFO of bytes kept in pooled chunks: a stream holds memory
// only while it has unread data, and a burst does not leave a large buffer
// behind. The zero value is empty. It is not safe for concurrent use (the
// conn's mu guards it).
type recvBuf struct {
	chunks []*[]byte // chunks[head:] are in use, each filled to its len
	head   int
	off    int // read offset in chunks[head]
	n      int // unread bytes
}

func (b *recvBuf) Len() int { return b.n }

// Write appends a copy of p.
func (b *recvBuf) Write(p []byte) {
	b.n += len(p)
	for len(p) > 0 {
		var last *[]byte
		if k := len(b.chunks); k > b.head && len(*b.chunks[k-1]) < cap(*b.chunks[k-1]) {
			last = b.chunks[k-1]
		} else {
			last = recvChunks.Get().(*[]byte)
			b.chunks = append(b.chunks, last)
		}
		l := len(*last)
		k := copy((*last)[l:cap(*last)], p)
		*last = (*last)[:l+k]
		p = p[k:]
	}
}

// appendChunk adds chunk, filled to its len and taken from recvChunks,
// after the data already there; b owns it from now on.
func (b *recvBuf) appendChunk(chunk *[]byte) {
	b.chunks = append(b.chunks, chunk)
	b.n += len(*chunk)
}

// next removes the first chunk and returns it with the offset of its
// unread bytes; the caller owns it (and puts it back in recvChunks). b must
// not be empty.
func (b *recvBuf) next() (chunk *[]byte, off int) {
	chunk, off = b.chunks[b.head], b.off
	b.n -= len(*chunk) - off
	b.chunks[b.head] = nil
	b.head++
	if b.head == len(b.chunks) {
		b.chunks = b.chunks[:0]
		b.head = 0
	}
	b.off = 0
	return chunk, off
}

// Read moves up to len(p) bytes into p and returns how many.
func (b *recvBuf) Read(p []byte) int {
	n := 0
	for n < len(p) && b.head < len(b.chunks) {
		c := b.chunks[b.head]
		k := copy(p[n:], (*c)[b.off:])
		n += k
		b.off += k
		if b.off == len(*c) {
			b.dropFirst()
		}
	}
	b.n -= n
	return n
}

func (b *recvBuf) dropFirst() {
	c := b.chunks[b.head]
	*c = (*c)[:0]
	recvChunks.Put(c)
	b.chunks[b.head] = nil
	b.head++
	if b.head == len(b.chunks) { // empty: reuse the slice from its start
		b.chunks = b.chunks[:0]
		b.head = 0
	}
	b.off = 0
}

// Reset discards everything, returning the chunks to the pool.
func (b *recvBuf) Reset() {
	for b.head < len(b.chunks) {
		b.dropFirst()
	}
	b.n = 0
}
