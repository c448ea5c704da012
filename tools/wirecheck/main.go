// wirecheck decodes one binary protobuf message from stdin with upstream Istio's own generated Go types and
// prints it as protojson, failing if any field came in unknown. The compatibility tests feed it messages
// serialized by istiopy's protos (written from field numbers, not copied), so a field number, type or
// name that drifted from upstream shows up as a difference or an unknown field.
//
// With --fill it works the other way: it prints (binary) an upstream message with every field set, oneof
// members chosen by the variant number, so the tests can list what upstream has that istiopy does not.
//
// Usage:
//
//	wirecheck <message full name> < message.bin
//	wirecheck --fill <message full name> <variant> > message.bin
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

// fill sets every field of m; in each oneof the member at index variant (mod its size).
func fill(m protoreflect.Message, variant, depth int, n *int) {
	if depth > 6 || m.Descriptor().FullName() == "google.protobuf.Any" {
		return
	}
	fields := m.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		if od := fd.ContainingOneof(); od != nil && !od.IsSynthetic() {
			if od.Fields().Get(variant%od.Fields().Len()) != fd {
				continue
			}
		}
		switch {
		case fd.IsMap():
			mp := m.Mutable(fd).Map()
			key := scalar(fd.MapKey(), n).MapKey()
			if fd.MapValue().Message() != nil {
				v := mp.NewValue()
				fill(v.Message(), variant, depth+1, n)
				mp.Set(key, v)
			} else {
				mp.Set(key, scalar(fd.MapValue(), n))
			}
		case fd.IsList():
			l := m.Mutable(fd).List()
			if fd.Message() != nil {
				v := l.NewElement()
				fill(v.Message(), variant, depth+1, n)
				l.Append(v)
			} else {
				l.Append(scalar(fd, n))
			}
		case fd.Message() != nil:
			fill(m.Mutable(fd).Message(), variant, depth+1, n)
		default:
			m.Set(fd, scalar(fd, n))
		}
	}
}

func scalar(fd protoreflect.FieldDescriptor, n *int) protoreflect.Value {
	*n++
	switch fd.Kind() {
	case protoreflect.StringKind:
		return protoreflect.ValueOfString(fmt.Sprintf("%s-%d", fd.Name(), *n))
	case protoreflect.BytesKind:
		return protoreflect.ValueOfBytes([]byte{byte(*n), 1, 2})
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(true)
	case protoreflect.EnumKind:
		vals := fd.Enum().Values()
		return protoreflect.ValueOfEnum(vals.Get(vals.Len() - 1).Number())
	case protoreflect.FloatKind:
		return protoreflect.ValueOfFloat32(float32(*n) + 0.5)
	case protoreflect.DoubleKind:
		return protoreflect.ValueOfFloat64(float64(*n) + 0.5)
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return protoreflect.ValueOfInt32(int32(*n))
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return protoreflect.ValueOfInt64(int64(*n))
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return protoreflect.ValueOfUint32(uint32(*n))
	default:
		return protoreflect.ValueOfUint64(uint64(*n))
	}
}

func main() {
	if len(os.Args) == 4 && os.Args[1] == "--fill" {
		mt, err := protoregistry.GlobalTypes.FindMessageByName(protoreflect.FullName(os.Args[2]))
		if err != nil {
			fmt.Fprintf(os.Stderr, "wirecheck: %s: %v\n", os.Args[2], err)
			os.Exit(2)
		}
		var variant int
		if _, err := fmt.Sscan(os.Args[3], &variant); err != nil {
			fmt.Fprintf(os.Stderr, "wirecheck: variant %q: %v\n", os.Args[3], err)
			os.Exit(2)
		}
		m := mt.New()
		n := 0
		fill(m, variant, 0, &n)
		out, err := proto.Marshal(m.Interface())
		if err != nil {
			fmt.Fprintf(os.Stderr, "wirecheck: %v\n", err)
			os.Exit(1)
		}
		os.Stdout.Write(out)
		return
	}
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
