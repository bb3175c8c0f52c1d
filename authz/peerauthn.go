package authz

import (
	"github.com/ambit-mesh/ambit/model"
)

// PeerAuthnMode returns the effective mTLS mode for dst: a PeerAuthentication
// with a selector matching dst in its namespace beats one for its whole
// namespace, which beats a mesh-wide one (MeshWide or in the root namespace,
// without selector). An UNSET mode inherits from the next level; when nothing
// sets a mode the result is PERMISSIVE. Among several at one level the first by
// key wins.
func (e Evaluator) PeerAuthnMode(snap *model.Snapshot, dst *model.Workload) model.PeerAuthnMode {
	if dst == nil {
		return model.MTLSStrict
	}
	var workload, namespace, mesh model.PeerAuthnMode
	// Only dst's namespace's, the root namespace's and mesh-wide ones can
	// apply: walked in key order.
	sc := indexOf(snap).pa.scope(dst.Namespace, e.root())
	for {
		it, ok := sc.next()
		if !ok {
			break
		}
		pa := it.v
		if pa.Mode == model.MTLSUnset {
			continue
		}
		meshWide := pa.MeshWide || pa.Namespace == e.root()
		switch {
		case pa.Namespace == dst.Namespace && len(pa.Selector) > 0:
			if workload == "" && e.selects(pa.Namespace, false, pa.Selector, dst) {
				workload = pa.Mode
			}
		case pa.Namespace == dst.Namespace && !pa.MeshWide:
			if namespace == "" {
				namespace = pa.Mode
			}
		case meshWide && len(pa.Selector) == 0:
			if mesh == "" {
				mesh = pa.Mode
			}
		}
	}
	switch {
	case workload != "":
		return workload
	case namespace != "":
		return namespace
	case mesh != "":
		return mesh
	}
	return model.MTLSPermissive
}

// AllowPlaintext decides whether a plaintext (non-HBONE) connection may reach
// dst: refused when the effective PeerAuthentication mode is STRICT, else
// subject to AuthorizationPolicy with no peer identity.
func (e Evaluator) AllowPlaintext(snap *model.Snapshot, dst *model.Workload, c Conn) Decision {
	c.SrcIdentity = zeroID
	if e.PeerAuthnMode(snap, dst) == model.MTLSStrict {
		return Decision{Reason: "plaintext refused: PeerAuthentication STRICT"}
	}
	return e.Evaluate(snap, dst, c)
}
