package hbone

import "syscall"

// errTooManyFiles is the accept error worth waiting out.
const errTooManyFiles = syscall.EMFILE
