// Package capb is the wire API of istiod-lite's certificate service
// (ambit.ca.v1.CertificateService), generated from ca.proto with the
// protoc-gen-go and protoc-gen-go-grpc versions pinned in go.mod. The service
// is implemented in istiod-lite/ca.
package capb

//go:generate sh -c "go build -o ${TMPDIR:-/tmp}/ambit-protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go && go build -o ${TMPDIR:-/tmp}/ambit-protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc && protoc --plugin=protoc-gen-go=${TMPDIR:-/tmp}/ambit-protoc-gen-go --plugin=protoc-gen-go-grpc=${TMPDIR:-/tmp}/ambit-protoc-gen-go-grpc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative ca.proto"
