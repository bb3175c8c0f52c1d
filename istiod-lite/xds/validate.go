package xds

import (
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

// validateResource runs protoc-gen-validate's ValidateAll on m and on every
// message packed in an Any inside it (the filters' typed_config of a
// listener, a cluster's typed_extension_protocol_options, ...), which
// ValidateAll itself does not open. An Any whose type this binary does not
// know is an error: the waypoint could not read it either.
func validateResource(m proto.Message) error {
	return validateMessage(m.ProtoReflect(), "", true)
}

type validatorAll interface{ ValidateAll() error }

// validateMessage runs m's ValidateAll if self is set (it covers the
// messages embedded in m) and looks for Anys in m.
func validateMessage(m protoreflect.Message, path string, self bool) error {
	if v, ok := m.Interface().(validatorAll); ok && self {
		if err := v.ValidateAll(); err != nil {
			if path != "" {
				return fmt.Errorf("%s: %w", path, err)
			}
			return err
		}
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Kind() != protoreflect.MessageKind && fd.Kind() != protoreflect.GroupKind {
			return true
		}
		p := path + "." + string(fd.Name())
		if path == "" {
			p = string(fd.Name())
		}
		switch {
		case fd.IsList():
			l := v.List()
			for i := range l.Len() {
				if err = validateNested(l.Get(i).Message(), fmt.Sprintf("%s[%d]", p, i)); err != nil {
					return false
				}
			}
		case fd.IsMap():
			if fd.MapValue().Kind() != protoreflect.MessageKind {
				return true
			}
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				err = validateNested(mv.Message(), fmt.Sprintf("%s[%q]", p, k.String()))
				return err == nil
			})
			return err == nil
		default:
			err = validateNested(v.Message(), p)
		}
		return err == nil
	})
	return err
}

// validateNested validates an embedded message: an Any is opened and its
// content validated in full; other messages are covered by the enclosing
// ValidateAll, but may hold Anys further down.
func validateNested(m protoreflect.Message, path string) error {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		return validateMessage(inner.ProtoReflect(), path, true)
	}
	return validateMessage(m, path, false)
}
