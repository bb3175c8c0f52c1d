package status

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"
	istiometa "istio.io/api/meta/v1alpha1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	metav1ac "k8s.io/client-go/applyconfigurations/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambit-mesh/ambit/istiod-lite/security"
)

// maxParents is the most parent statuses a route holds (Gateway API's
// MaxItems).
const maxParents = 32

// writeHTTPRoute writes an HTTPRoute's parent statuses.
func (t *term) writeHTTPRoute(ctx context.Context, k ref, w *want) (bool, error) {
	if t.httpRoutes == nil {
		return false, nil
	}
	rt, err := t.httpRoutes.HTTPRoutes(k.Namespace).Get(k.Name)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("get httproute: %w", err)
	}
	if rt.Generation != w.Generation || t.skip(k, rt.ResourceVersion, w) {
		return false, nil // a translation of the new generation is on its way
	}
	parents, changed := mergeParents(rt.Status.Parents, w.Parents, metav1.Now())
	if !changed {
		return false, nil
	}
	if err := t.limiter.Wait(ctx); err != nil {
		return false, err
	}
	upd := rt.DeepCopy()
	upd.Status.Parents = parents
	got, err := t.w.cfg.Gateway.GatewayV1().HTTPRoutes(k.Namespace).UpdateStatus(ctx, upd, metav1.UpdateOptions{FieldManager: FieldManager})
	if err != nil {
		return false, fmt.Errorf("update httproute status: %w", err)
	}
	t.wrote(k, rt.ResourceVersion, got.ResourceVersion, w)
	t.w.log.Info("route status", "kind", k.Kind, "namespace", k.Namespace, "name", k.Name, "parents", len(w.Parents))
	return true, nil
}

// writeGRPCRoute writes a GRPCRoute's parent statuses.
func (t *term) writeGRPCRoute(ctx context.Context, k ref, w *want) (bool, error) {
	if t.grpcRoutes == nil {
		return false, nil
	}
	rt, err := t.grpcRoutes.GRPCRoutes(k.Namespace).Get(k.Name)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("get grpcroute: %w", err)
	}
	if rt.Generation != w.Generation || t.skip(k, rt.ResourceVersion, w) {
		return false, nil
	}
	parents, changed := mergeParents(rt.Status.Parents, w.Parents, metav1.Now())
	if !changed {
		return false, nil
	}
	if err := t.limiter.Wait(ctx); err != nil {
		return false, err
	}
	upd := rt.DeepCopy()
	upd.Status.Parents = parents
	got, err := t.w.cfg.Gateway.GatewayV1().GRPCRoutes(k.Namespace).UpdateStatus(ctx, upd, metav1.UpdateOptions{FieldManager: FieldManager})
	if err != nil {
		return false, fmt.Errorf("update grpcroute status: %w", err)
	}
	t.wrote(k, rt.ResourceVersion, got.ResourceVersion, w)
	t.w.log.Info("route status", "kind", k.Kind, "namespace", k.Namespace, "name", k.Name, "parents", len(w.Parents))
	return true, nil
}

// mergeParents returns cur with this controller's entries replaced by
// want's (each condition keeps its LastTransitionTime while its status
// holds; a new one gets now), other controllers' entries unchanged and
// first, and whether that differs from cur.
func mergeParents(cur, want []gwv1.RouteParentStatus, now metav1.Time) ([]gwv1.RouteParentStatus, bool) {
	var out, ours []gwv1.RouteParentStatus
	for _, p := range cur {
		if p.ControllerName == ControllerName {
			ours = append(ours, p)
		} else {
			out = append(out, p)
		}
	}
	room := max(maxParents-len(out), 0)
	for i, p := range want {
		if i >= room {
			break // the list is full of other controllers' entries
		}
		var old []metav1.Condition
		for _, o := range ours {
			if equality.Semantic.DeepEqual(o.ParentRef, p.ParentRef) {
				old = o.Conditions
				break
			}
		}
		p.Conditions = keepTimes(old, p.Conditions, now)
		out = append(out, p)
	}
	if len(out) == 0 && len(cur) == 0 {
		return cur, false
	}
	return out, !equality.Semantic.DeepEqual(cur, out)
}

// keepTimes returns want's conditions with LastTransitionTime set: old's
// for a condition whose status is unchanged, else now.
func keepTimes(old, want []metav1.Condition, now metav1.Time) []metav1.Condition {
	out := make([]metav1.Condition, len(want))
	for i, c := range want {
		c.LastTransitionTime = now
		for _, o := range old {
			if o.Type == c.Type && o.Status == c.Status {
				c.LastTransitionTime = o.LastTransitionTime
			}
		}
		out[i] = c
	}
	return out
}

// sameCondition reports whether two conditions say the same (all but the
// transition time).
func sameCondition(a, b metav1.Condition) bool {
	return a.Type == b.Type && a.Status == b.Status && a.Reason == b.Reason && a.Message == b.Message && a.ObservedGeneration == b.ObservedGeneration
}

// writeService applies a Service's istio.io/WaypointBound condition (or,
// with none wanted, releases it) with server-side apply on the status
// subresource: the field manager owns that one list entry, so other
// conditions and the load balancer status are never touched.
func (t *term) writeService(ctx context.Context, k ref, w *want) (bool, error) {
	svc, err := t.services.Services(k.Namespace).Get(k.Name)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("get service: %w", err)
	}
	if !serviceLabelsEqual(svc, w) || t.skip(k, svc.ResourceVersion, w) {
		return false, nil
	}
	apply, changed := serviceConditions(svc.Status.Conditions, w.Conditions, metav1.Now())
	if !changed {
		return false, nil
	}
	st := corev1ac.ServiceStatus()
	for _, c := range apply {
		st.WithConditions(metav1ac.Condition().WithType(c.Type).WithStatus(c.Status).WithReason(c.Reason).WithMessage(c.Message).
			WithObservedGeneration(c.ObservedGeneration).WithLastTransitionTime(c.LastTransitionTime))
	}
	if err := t.limiter.Wait(ctx); err != nil {
		return false, err
	}
	got, err := t.w.cfg.Kube.CoreV1().Services(k.Namespace).ApplyStatus(ctx, corev1ac.Service(k.Name, k.Namespace).WithStatus(st),
		metav1.ApplyOptions{FieldManager: FieldManager, Force: true})
	if err != nil {
		return false, fmt.Errorf("apply service status: %w", err)
	}
	t.wrote(k, svc.ResourceVersion, got.ResourceVersion, w)
	bound := "none"
	if len(apply) > 0 {
		bound = string(apply[0].Status)
	}
	t.w.log.Info("service status", "namespace", k.Namespace, "name", k.Name, "waypointBound", bound)
	return true, nil
}

// serviceConditions returns the conditions to apply (want's, with their
// transition times) and whether cur differs from them in this writer's
// types: a wanted condition missing or different, or one of ours present
// and no longer wanted.
func serviceConditions(cur []metav1.Condition, want []metav1.Condition, now metav1.Time) ([]metav1.Condition, bool) {
	var old []metav1.Condition
	for _, c := range cur {
		if c.Type == ConditionWaypointBound {
			old = append(old, c)
		}
	}
	apply := keepTimes(old, want, now)
	if len(old) != len(apply) {
		return apply, true
	}
	for i := range old {
		if !sameCondition(old[i], apply[i]) {
			return apply, true
		}
	}
	return apply, false
}

// writePolicy writes an AuthorizationPolicy's condition (Istio's format),
// keeping the conditions of other types and the rest of the status.
func (t *term) writePolicy(ctx context.Context, k ref, w *want) (bool, error) {
	if t.policies == nil {
		return false, nil
	}
	obj, err := t.policies.ByNamespace(k.Namespace).Get(k.Name)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("get authorizationpolicy: %w", err)
	}
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return false, fmt.Errorf("authorizationpolicy: unexpected %T", obj)
	}
	if u.GetGeneration() != w.Generation || t.skip(k, u.GetResourceVersion(), w) {
		return false, nil
	}
	cur, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	conds, changed, err := mergePolicyConditions(cur, w.Conditions, time.Now())
	if err != nil || !changed {
		return false, err
	}
	upd := u.DeepCopy()
	if err := unstructured.SetNestedSlice(upd.Object, conds, "status", "conditions"); err != nil {
		return false, fmt.Errorf("authorizationpolicy status: %w", err)
	}
	if err := t.limiter.Wait(ctx); err != nil {
		return false, err
	}
	got, err := t.w.cfg.Dynamic.Resource(security.AuthorizationPolicies).Namespace(k.Namespace).UpdateStatus(ctx, upd, metav1.UpdateOptions{FieldManager: FieldManager})
	if err != nil {
		return false, fmt.Errorf("update authorizationpolicy status: %w", err)
	}
	t.wrote(k, u.GetResourceVersion(), got.GetResourceVersion(), w)
	t.w.log.Info("policy status", "namespace", k.Namespace, "name", k.Name, "type", w.Conditions[0].Type, "status", w.Conditions[0].Status)
	return true, nil
}

// mergePolicyConditions returns the status.conditions list with this
// writer's types (ZtunnelAccepted, WaypointAccepted) replaced by want, in
// Istio's IstioCondition format (a type no longer wanted is removed; each
// keeps its lastTransitionTime while its status holds), other entries kept
// as they are and first; and whether it differs from cur.
func mergePolicyConditions(cur []any, want []metav1.Condition, now time.Time) ([]any, bool, error) {
	var out []any
	old := map[string]*istiometa.IstioCondition{}
	for _, e := range cur {
		m, ok := e.(map[string]any)
		typ, _ := m["type"].(string)
		if !ok || !slices.Contains(policyTypes, typ) {
			out = append(out, e)
			continue
		}
		b, err := json.Marshal(m)
		if err != nil {
			return nil, false, fmt.Errorf("condition %s: %w", typ, err)
		}
		c := &istiometa.IstioCondition{}
		if err := c.UnmarshalJSON(b); err != nil {
			c = nil // unreadable: rewritten
		}
		old[typ] = c
	}
	changed := len(old) != len(want)
	for _, c := range want {
		ic := &istiometa.IstioCondition{
			Type: c.Type, Status: string(c.Status), Reason: c.Reason, Message: c.Message,
			ObservedGeneration: c.ObservedGeneration, LastTransitionTime: timestamppb.New(now.Truncate(time.Second)),
		}
		if o, ok := old[c.Type]; !ok || o == nil {
			changed = true
		} else {
			if o.Status == ic.Status && o.LastTransitionTime != nil {
				ic.LastTransitionTime = o.LastTransitionTime
			}
			if o.Status != ic.Status || o.Reason != ic.Reason || o.Message != ic.Message || o.ObservedGeneration != ic.ObservedGeneration {
				changed = true
			}
		}
		b, err := ic.MarshalJSON()
		if err != nil {
			return nil, false, fmt.Errorf("condition %s: %w", c.Type, err)
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			return nil, false, fmt.Errorf("condition %s: %w", c.Type, err)
		}
		out = append(out, m)
	}
	return out, changed, nil
}
