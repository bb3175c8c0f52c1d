package xdsclient

import (
	"fmt"
	"maps"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// Type is one subscribed resource type.
type Type struct {
	// URL is the type URL, e.g.
	// "type.googleapis.com/envoy.config.cluster.v3.Cluster". Required.
	URL string
	// Names are the resources subscribed to; none means wildcard ("*").
	Names []string
	// Decode decodes and validates one resource (named name); its value is
	// what Apply and the Snapshot carry. An error NACKs the whole response.
	// Nil: the value is the *anypb.Any itself.
	Decode func(name string, res *anypb.Any) (any, error)
	// Apply, if set, applies one response of this type once every resource
	// in it decoded: all of it, or (returning an error, which NACKs the
	// response) nothing of it.
	Apply func(Delta) error
}

// Resource is one accepted resource.
type Resource struct {
	Name    string
	Version string
	Value   any // Decode's result
}

// Delta is one response of one type, decoded.
type Delta struct {
	TypeURL string
	Updated []Resource // added or changed
	Removed []string   // names
}

// Snapshot is the client's whole accepted state across types, for
// Client.OnUpdate. It is immutable: a consumer may keep it.
type Snapshot struct {
	// TypeURL is the type of the response this snapshot applies.
	TypeURL string
	// Version counts the responses accepted by the client, this one
	// included.
	Version uint64

	types    []string                       // subscribed type URLs
	sets     map[string]map[string]Resource // type URL -> name -> resource; never modified
	received map[string]bool                // type URL -> a response was accepted (this one included)
}

// Resources returns the current resources of typeURL by name. The map must
// not be modified.
func (s *Snapshot) Resources(typeURL string) map[string]Resource { return s.sets[typeURL] }

// Received reports whether a response of typeURL has been accepted (the
// first response of a type may be empty: nothing of that type exists).
func (s *Snapshot) Received(typeURL string) bool { return s.received[typeURL] }

// Complete reports whether every subscribed type has been received.
func (s *Snapshot) Complete() bool {
	for _, t := range s.types {
		if !s.received[t] {
			return false
		}
	}
	return true
}

// Values returns the decoded values of typeURL in s by name, as T (values
// of another type are left out).
func Values[T any](s *Snapshot, typeURL string) map[string]T {
	rs := s.Resources(typeURL)
	out := make(map[string]T, len(rs))
	for name, r := range rs {
		if v, ok := r.Value.(T); ok {
			out[name] = v
		}
	}
	return out
}

// next returns a copy of s with d applied (only d's type's set is copied).
func (s *Snapshot) next(d Delta) *Snapshot {
	n := &Snapshot{TypeURL: d.TypeURL, Version: s.Version + 1, types: s.types,
		sets: maps.Clone(s.sets), received: maps.Clone(s.received)}
	if n.sets == nil {
		n.sets = map[string]map[string]Resource{}
		n.received = map[string]bool{}
	}
	set := maps.Clone(n.sets[d.TypeURL])
	if set == nil {
		set = make(map[string]Resource, len(d.Updated))
	}
	for _, r := range d.Updated {
		set[r.Name] = r
	}
	for _, name := range d.Removed {
		delete(set, name)
	}
	n.sets[d.TypeURL] = set
	n.received[d.TypeURL] = true
	return n
}

// validator is what go-control-plane's generated messages implement.
type validator interface{ ValidateAll() error }
type shallowValidator interface{ Validate() error }

// Proto returns a Decode for messages of type T: it unmarshals into a new
// *T and runs its ValidateAll (else Validate) method, if it has one. The
// value is the *T.
func Proto[T any, PT interface {
	*T
	proto.Message
}]() func(name string, res *anypb.Any) (any, error) {
	return func(name string, res *anypb.Any) (any, error) {
		m := PT(new(T))
		if err := proto.Unmarshal(res.GetValue(), m); err != nil {
			return nil, fmt.Errorf("decode: %w", err)
		}
		var err error
		switch v := any(m).(type) {
		case validator:
			err = v.ValidateAll()
		case shallowValidator:
			err = v.Validate()
		}
		if err != nil {
			return nil, fmt.Errorf("invalid: %w", err)
		}
		return m, nil
	}
}
