package auth

import "context"

// callerCtxKey is the context key of an authenticated *Caller.
type callerCtxKey struct{}

// NewContext returns ctx carrying c: the caller an admission step (the
// 15012 gate's tap) has already authenticated, so that the services do not
// authenticate the call again.
func NewContext(ctx context.Context, c *Caller) context.Context {
	return context.WithValue(ctx, callerCtxKey{}, c)
}

// FromContext returns the caller NewContext put in ctx.
func FromContext(ctx context.Context) (*Caller, bool) {
	c, ok := ctx.Value(callerCtxKey{}).(*Caller)
	return c, ok && c != nil
}
