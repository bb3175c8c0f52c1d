// Package workload is ambit's xDS API between istiod-lite and ztunnels
// (proto package ambit.workload.v1, workload.proto) and its conversion to and
// from the config model. The generated code (workload.pb.go) is committed;
// `go generate ./api/workload` regenerates it.
package workload

//go:generate sh -c "go build -o ${TMPDIR:-/tmp}/ambit-protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go && protoc --plugin=protoc-gen-go=${TMPDIR:-/tmp}/ambit-protoc-gen-go -I../.. --go_out=../.. --go_opt=paths=source_relative api/workload/workload.proto"
