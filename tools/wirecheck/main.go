// wirecheck decodes one binary protobuf message from stdin with upstream Istio's own generated Go types and
// prints it as protojson, failing if any field came in unknown. The compatibility tests feed it messages
// serialized by istiopy's protos (written from field numbers, not copied), so a field number, type or
// name that drifted from upstream shows up as a difference or an unknown field.
//
// Usage: wirecheck <message full name> < message.bin
package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	// Upstream's types register themselves by full name.
	_ "istio.io/api/security/v1alpha1"
	_ "istio.io/istio/pkg/workloadapi"
	_ "istio.io/istio/pkg/workloadapi/security"
	_ "istio.io/istio/pkg/zdsapi"
)

// unknown lists the paths of fields the upstream type does not know, recursively.
func unknown(m protoreflect.Message, path string) []string {
	var out []string
	if len(m.GetUnknown()) > 0 {
		out = append(out, path+"(unknown fields)")
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		p := path + "." + string(fd.Name())
		switch {
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				out = append(out, unknown(mv.Message(), fmt.Sprintf("%s[%v]", p, k.Interface()))...)
				return true
			})
		case fd.IsList() && fd.Message() != nil:
			for i := 0; i < v.List().Len(); i++ {
				out = append(out, unknown(v.List().Get(i).Message(), fmt.Sprintf("%s[%d]", p, i))...)
			}
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			out = append(out, unknown(v.Message(), p)...)
		}
		return true
	})
	return out
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: wirecheck <message full name> < message.bin")
		os.Exit(2)
	}
	mt, err := protoregistry.GlobalTypes.FindMessageByName(protoreflect.FullName(os.Args[1]))
	if err != nil {
		fmt.Fprintf(os.Stderr, "wirecheck: %s: %v\n", os.Args[1], err)
		os.Exit(2)
	}
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "wirecheck: %v\n", err)
		os.Exit(2)
	}
	m := mt.New().Interface()
	if err := proto.Unmarshal(data, m); err != nil {
		fmt.Fprintf(os.Stderr, "wirecheck: upstream %s cannot decode it: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	if u := unknown(m.ProtoReflect(), os.Args[1]); len(u) > 0 {
		fmt.Fprintf(os.Stderr, "wirecheck: fields upstream %s does not know: %s\n", os.Args[1], strings.Join(u, ", "))
		os.Exit(1)
	}
	out, err := protojson.Marshal(m)
	if err != nil {
		fmt.Fprintf(os.Stderr, "wirecheck: %v\n", err)
		os.Exit(1)
	}
	os.Stdout.Write(out)
}
