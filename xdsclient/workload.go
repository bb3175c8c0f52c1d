package xdsclient

import (
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/model"
)

// WorkloadTypes are the ztunnel's subscriptions: every workload, service,
// authorization policy and peer authentication (ambit.workload.v1,
// wildcard), each response applied to store as one model.Delta.
func WorkloadTypes(store *model.Store) []Type {
	apply := func(set func(d *model.Delta, values []any, removed []string)) func(Delta) error {
		return func(in Delta) error {
			values := make([]any, len(in.Updated))
			for i, r := range in.Updated {
				values[i] = r.Value
			}
			d := &model.Delta{}
			set(d, values, in.Removed)
			store.Apply(d)
			return nil
		}
	}
	return []Type{
		{
			URL: workload.WorkloadType,
			Decode: decode(func(m *workload.Workload) (*model.Workload, string, error) {
				w, err := workload.ToWorkload(m)
				if err != nil {
					return nil, "", err
				}
				return w, w.UID, nil
			}),
			Apply: apply(func(d *model.Delta, vs []any, removed []string) {
				d.Workloads, d.RemovedWorkloads = as[*model.Workload](vs), removed
			}),
		},
		{
			URL: workload.ServiceType,
			Decode: decode(func(m *workload.Service) (*model.Service, string, error) {
				s, err := workload.ToService(m)
				if err != nil {
					return nil, "", err
				}
				return s, s.Key(), nil
			}),
			Apply: apply(func(d *model.Delta, vs []any, removed []string) {
				d.Services, d.RemovedServices = as[*model.Service](vs), removed
			}),
		},
		{
			URL: workload.AuthorizationType,
			Decode: decode(func(m *workload.Authorization) (*model.Policy, string, error) {
				p, err := workload.ToPolicy(m)
				if err != nil {
					return nil, "", err
				}
				return p, p.Key(), nil
			}),
			Apply: apply(func(d *model.Delta, vs []any, removed []string) {
				d.Policies, d.RemovedPolicies = as[*model.Policy](vs), removed
			}),
		},
		{
			URL: workload.PeerAuthenticationType,
			Decode: decode(func(m *workload.PeerAuthentication) (*model.PeerAuthentication, string, error) {
				p, err := workload.ToPeerAuthn(m)
				if err != nil {
					return nil, "", err
				}
				return p, p.Key(), nil
			}),
			Apply: apply(func(d *model.Delta, vs []any, removed []string) {
				d.PeerAuthn, d.RemovedPeerAuthn = as[*model.PeerAuthentication](vs), removed
			}),
		},
	}
}

// decode unmarshals a P, converts it and checks that the resource's name is
// the converted value's key.
func decode[M any, PM interface {
	*M
	proto.Message
}, V any](convert func(PM) (V, string, error)) func(string, *anypb.Any) (any, error) {
	return func(name string, a *anypb.Any) (any, error) {
		m := PM(new(M))
		if err := proto.Unmarshal(a.GetValue(), m); err != nil {
			return nil, err
		}
		v, key, err := convert(m)
		if err != nil {
			return nil, err
		}
		if key != name {
			return nil, fmt.Errorf("name %s != key %s", name, key)
		}
		return v, nil
	}
}

func as[T any](vs []any) []T {
	out := make([]T, len(vs))
	for i, v := range vs {
		out[i] = v.(T)
	}
	return out
}
