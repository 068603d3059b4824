package daemon

import (
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hvpatch/hvpatch/docs"
	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/hvpatch/hvpatch/service"
)

// openAPI is the part of docs/openapi.json the tests read.
type openAPI struct {
	OpenAPI    string                                `json:"openapi"`
	Paths      map[string]map[string]json.RawMessage `json:"paths"`
	Components struct {
		Schemas map[string]*schema `json:"schemas"`
	} `json:"components"`
}

type schema struct {
	Ref                  string             `json:"$ref"`
	Type                 string             `json:"type"`
	Format               string             `json:"format"`
	Enum                 []string           `json:"enum"`
	Properties           map[string]*schema `json:"properties"`
	Required             []string           `json:"required"`
	Items                *schema            `json:"items"`
	AdditionalProperties json.RawMessage    `json:"additionalProperties"`
}

type operation struct {
	OperationID string `json:"operationId"`
	RequestBody *struct {
		Content map[string]struct {
			Schema *schema `json:"schema"`
		} `json:"content"`
	} `json:"requestBody"`
	Responses map[string]struct {
		Ref     string `json:"$ref"`
		Content map[string]struct {
			Schema *schema `json:"schema"`
		} `json:"content"`
	} `json:"responses"`
}

var httpMethods = []string{"get", "put", "post", "delete", "options", "head", "patch", "trace"}

func loadOpenAPI(t *testing.T) *openAPI {
	t.Helper()
	var doc openAPI
	if err := json.Unmarshal(docs.OpenAPI, &doc); err != nil {
		t.Fatalf("docs/openapi.json: %v", err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.") {
		t.Fatalf("docs/openapi.json: openapi %q, want 3.x", doc.OpenAPI)
	}
	return &doc
}

// methods are the HTTP methods the document gives a path, upper case.
func (doc *openAPI) methods(path string) []string {
	var ms []string
	for k := range doc.Paths[path] {
		if slices.Contains(httpMethods, k) {
			ms = append(ms, strings.ToUpper(k))
		}
	}
	sort.Strings(ms)
	return ms
}

func (doc *openAPI) operation(t *testing.T, path, method string) operation {
	t.Helper()
	var op operation
	if err := json.Unmarshal(doc.Paths[path][strings.ToLower(method)], &op); err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return op
}

// sourceRoutes are the patterns Handler registers, read from the daemon's
// source: the string arguments of mux.Handle and mux.HandleFunc, with
// APIVersion and the parameters of local helpers (kernel("info", ...))
// substituted by every value they are called with.
func sourceRoutes(t *testing.T) []string {
	t.Helper()
	files, _ := filepath.Glob("*.go")
	fset := token.NewFileSet()
	var handler *ast.FuncDecl
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range af.Decls {
			if fd, ok := d.(*ast.FuncDecl); ok && fd.Name.Name == "Handler" && fd.Recv != nil {
				handler = fd
			}
		}
	}
	if handler == nil {
		t.Fatal("no (*Daemon).Handler in the daemon's source")
	}
	// Local helpers: name -> function literal.
	helpers := map[string]*ast.FuncLit{}
	ast.Inspect(handler.Body, func(n ast.Node) bool {
		if as, ok := n.(*ast.AssignStmt); ok && len(as.Lhs) == 1 && len(as.Rhs) == 1 {
			if id, ok := as.Lhs[0].(*ast.Ident); ok {
				if fl, ok := as.Rhs[0].(*ast.FuncLit); ok {
					helpers[id.Name] = fl
				}
			}
		}
		return true
	})
	var eval func(e ast.Expr, env map[string][]string) []string
	eval = func(e ast.Expr, env map[string][]string) []string {
		switch e := e.(type) {
		case *ast.BasicLit:
			s, err := strconv.Unquote(e.Value)
			if err != nil {
				t.Fatalf("%s: %v", fset.Position(e.Pos()), err)
			}
			return []string{s}
		case *ast.Ident:
			if e.Name == "APIVersion" {
				return []string{APIVersion}
			}
			if vs, ok := env[e.Name]; ok {
				return vs
			}
		case *ast.BinaryExpr:
			if e.Op == token.ADD {
				var out []string
				for _, a := range eval(e.X, env) {
					for _, b := range eval(e.Y, env) {
						out = append(out, a+b)
					}
				}
				return out
			}
		case *ast.ParenExpr:
			return eval(e.X, env)
		}
		t.Fatalf("%s: cannot evaluate the route pattern %T: extend sourceRoutes", fset.Position(e.Pos()), e)
		return nil
	}
	// Each helper's parameters take the values of its calls' arguments.
	envs := map[*ast.FuncLit]map[string][]string{}
	ast.Inspect(handler.Body, func(n ast.Node) bool {
		call, ok := n.(*ast.CallExpr)
		if !ok {
			return true
		}
		id, ok := call.Fun.(*ast.Ident)
		if !ok || helpers[id.Name] == nil {
			return true
		}
		fl := helpers[id.Name]
		if envs[fl] == nil {
			envs[fl] = map[string][]string{}
		}
		i := 0
		for _, field := range fl.Type.Params.List {
			for _, name := range field.Names {
				if i < len(call.Args) {
					if lit, ok := call.Args[i].(*ast.BasicLit); ok && lit.Kind == token.STRING {
						envs[fl][name.Name] = append(envs[fl][name.Name], eval(lit, nil)...)
					}
				}
				i++
			}
		}
		return true
	})
	var routes []string
	ast.Inspect(handler.Body, func(n ast.Node) bool {
		call, ok := n.(*ast.CallExpr)
		if !ok {
			return true
		}
		sel, ok := call.Fun.(*ast.SelectorExpr)
		if !ok || (sel.Sel.Name != "Handle" && sel.Sel.Name != "HandleFunc") || len(call.Args) != 2 {
			return true
		}
		env := map[string][]string{}
		for _, fl := range helpers {
			if fl.Pos() <= call.Pos() && call.End() <= fl.End() {
				env = envs[fl]
			}
		}
		routes = append(routes, eval(call.Args[0], env)...)
		return true
	})
	sort.Strings(routes)
	return routes
}

// TestOpenAPIRoutes: the routes of docs/openapi.json are exactly the
// routes Handler serves: every "METHOD PATH" registered in the source is in
// the document and nothing else is, and the real handler routes each
// documented method of each path to a handler and answers the others with
// 405 listing exactly the documented methods.
func TestOpenAPIRoutes(t *testing.T) {
	doc := loadOpenAPI(t)
	var documented []string
	for p := range doc.Paths {
		for _, m := range doc.methods(p) {
			documented = append(documented, m+" "+p)
		}
	}
	sort.Strings(documented)
	served := sourceRoutes(t)
	if len(served) < 15 {
		t.Fatalf("only %d routes found in Handler's source: %q", len(served), served)
	}
	if !slices.Equal(served, documented) {
		for _, r := range served {
			if !slices.Contains(documented, r) {
				t.Errorf("served but not in docs/openapi.json: %s", r)
			}
		}
		for _, r := range documented {
			if !slices.Contains(served, r) {
				t.Errorf("in docs/openapi.json but not served: %s", r)
			}
		}
	}

	d := &Daemon{cfg: &Config{}, log: slog.New(slog.NewTextHandler(io.Discard, nil)), metrics: NewMetrics(),
		domains: map[string]*domain{}, reported: map[string]string{}}
	h := d.Handler()
	probe := func(method, path string) *http.Response {
		req := httptest.NewRequest(method, path, strings.NewReader("{}"))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec.Result()
	}
	// The mux's own answers: 404 "page not found" and 405 with Allow.
	routed := func(resp *http.Response) bool {
		if resp.StatusCode == http.StatusMethodNotAllowed && resp.Header.Get("Allow") != "" {
			return false
		}
		return !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") || resp.StatusCode != http.StatusNotFound
	}
	for p := range doc.Paths {
		url := strings.ReplaceAll(p, "{domain}", "no-such-domain")
		want := doc.methods(p)
		allow := slices.Clone(want)
		if slices.Contains(want, "GET") {
			allow = append(allow, "HEAD")
		}
		sort.Strings(allow)
		for _, m := range []string{"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"} {
			resp := probe(m, url)
			if slices.Contains(allow, m) {
				if !routed(resp) {
					t.Errorf("%s %s: documented, but the handler does not route it (%s)", m, url, resp.Status)
				}
				continue
			}
			if resp.StatusCode != http.StatusMethodNotAllowed {
				t.Errorf("%s %s: not documented, answered %s, want 405", m, url, resp.Status)
				continue
			}
			got := strings.Split(strings.ReplaceAll(resp.Header.Get("Allow"), " ", ""), ",")
			sort.Strings(got)
			if !slices.Equal(got, allow) {
				t.Errorf("%s %s: Allow %q, documented %q", m, url, got, allow)
			}
		}
	}
	for _, p := range []string{"/", "/v1", "/v1/", "/v1/domains/x", "/v1/domains/x/nothing", "/v2/health", "/openapi.yaml"} {
		if resp := probe("GET", p); routed(resp) {
			t.Errorf("GET %s: routed (%s), but no such path is documented", p, resp.Status)
		}
	}

	// /openapi.json serves the document itself.
	resp := probe("GET", "/openapi.json")
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" || string(body) != string(docs.OpenAPI) {
		t.Errorf("GET /openapi.json: %s %q, %d bytes; want docs/openapi.json", resp.Status, resp.Header.Get("Content-Type"), len(body))
	}
	if disk, err := os.ReadFile("../docs/openapi.json"); err != nil || string(disk) != string(docs.OpenAPI) {
		t.Errorf("the embedded document differs from docs/openapi.json (%v)", err)
	}
}

// apiTypes are the Go types each schema of components describes.
var apiTypes = map[string]reflect.Type{
	"Error":         reflect.TypeFor[ErrorBody](),
	"Health":        reflect.TypeFor[Health](),
	"DomainInfo":    reflect.TypeFor[hypervisor.DomainInfo](),
	"PatchFile":     reflect.TypeFor[PatchFile](),
	"Info":          reflect.TypeFor[service.Info](),
	"Symbol":        reflect.TypeFor[service.Symbol](),
	"SymbolInfo":    reflect.TypeFor[service.SymbolInfo](),
	"SymLookup":     reflect.TypeFor[service.SymLookup](),
	"Bytes":         reflect.TypeFor[service.Bytes](),
	"Inst":          reflect.TypeFor[service.Inst](),
	"Listing":       reflect.TypeFor[service.Listing](),
	"ReadResult":    reflect.TypeFor[service.ReadResult](),
	"Task":          reflect.TypeFor[service.Task](),
	"Module":        reflect.TypeFor[service.Module](),
	"BTFHeader":     reflect.TypeFor[service.BTFHeader](),
	"EditBytes":     reflect.TypeFor[service.EditBytes](),
	"PatchStatus":   reflect.TypeFor[service.PatchStatus](),
	"Declared":      reflect.TypeFor[service.Declared](),
	"Status":        reflect.TypeFor[service.Status](),
	"ApplyRequest":  reflect.TypeFor[ApplyRequest](),
	"RevertRequest": reflect.TypeFor[RevertRequest](),
	"Freeze":        reflect.TypeFor[service.Freeze](),
	"Edit":          reflect.TypeFor[service.Edit](),
	"Replacement":   reflect.TypeFor[service.Replacement](),
	"Plan":          reflect.TypeFor[service.Plan](),
	"PatchResult":   reflect.TypeFor[service.PatchResult](),
}

// apiAnswers are the Go types of each operation's 200 answer and request
// body (what the handlers in api.go reply with and decode).
var apiAnswers = map[string]struct{ reply, body reflect.Type }{
	"health":  {reflect.TypeFor[Health](), nil},
	"domains": {reflect.TypeFor[service.Domains](), nil},
	"patches": {reflect.TypeFor[[]PatchFile](), nil},
	"info":    {reflect.TypeFor[service.Info](), nil},
	"sym":     {reflect.TypeFor[service.SymLookup](), nil},
	"syms":    {reflect.TypeFor[service.SymbolList](), nil},
	"read":    {reflect.TypeFor[service.ReadResult](), nil},
	"mem":     {reflect.TypeFor[service.Bytes](), nil},
	"ps":      {reflect.TypeFor[service.Tasks](), nil},
	"lsmod":   {reflect.TypeFor[service.Modules](), nil},
	"btf":     {reflect.TypeFor[service.BTFHeader](), nil},
	"status":  {reflect.TypeFor[service.Status](), nil},
	"apply":   {reflect.TypeFor[service.PatchResult](), reflect.TypeFor[ApplyRequest]()},
	"revert":  {reflect.TypeFor[service.PatchResult](), reflect.TypeFor[RevertRequest]()},
}

// TestOpenAPISchemas: each schema has exactly the JSON fields of its Go
// type, with matching JSON types, and marks required exactly the fields
// that are always present (no omitempty or omitzero); each operation
// answers (and takes) the schema of the Go value its handler replies with
// (and decodes).
func TestOpenAPISchemas(t *testing.T) {
	doc := loadOpenAPI(t)
	for name := range doc.Components.Schemas {
		if apiTypes[name] == nil {
			t.Errorf("schema %s: no Go type known for it (apiTypes)", name)
		}
	}
	for name, typ := range apiTypes {
		s := doc.Components.Schemas[name]
		if s == nil {
			t.Errorf("schema %s (%v): missing from docs/openapi.json", name, typ)
			continue
		}
		checkSchema(t, doc, name, s, typ)
	}
	seen := map[string]bool{}
	for p := range doc.Paths {
		for _, m := range doc.methods(p) {
			op := doc.operation(t, p, m)
			where := m + " " + p
			if op.Responses["200"].Content == nil {
				t.Errorf("%s: no 200 answer described", where)
				continue
			}
			for code, r := range op.Responses {
				if code != "200" && r.Ref == "" && r.Content["application/json"].Schema == nil {
					t.Errorf("%s: answer %s has no schema", where, code)
				}
			}
			if p == "/metrics" || p == "/openapi.json" {
				continue
			}
			want, ok := apiAnswers[op.OperationID]
			if !ok {
				t.Errorf("%s: operation %q has no Go type known (apiAnswers)", where, op.OperationID)
				continue
			}
			seen[op.OperationID] = true
			checkSchema(t, doc, where+" 200", op.Responses["200"].Content["application/json"].Schema, want.reply)
			switch {
			case want.body == nil && op.RequestBody != nil:
				t.Errorf("%s: documents a request body the handler does not read", where)
			case want.body != nil && op.RequestBody == nil:
				t.Errorf("%s: the request body (%v) is not documented", where, want.body)
			case want.body != nil:
				checkSchema(t, doc, where+" request", op.RequestBody.Content["application/json"].Schema, want.body)
			}
		}
	}
	for id := range apiAnswers {
		if !seen[id] {
			t.Errorf("operation %s: not in docs/openapi.json", id)
		}
	}
}

var timeType = reflect.TypeFor[time.Time]()

// checkSchema compares schema s with Go type typ as encoding/json writes it.
func checkSchema(t *testing.T, doc *openAPI, where string, s *schema, typ reflect.Type) {
	t.Helper()
	for typ.Kind() == reflect.Pointer {
		typ = typ.Elem()
	}
	if s.Ref != "" {
		name := strings.TrimPrefix(s.Ref, "#/components/schemas/")
		if apiTypes[name] != typ {
			t.Errorf("%s: refers to %s (%v), the Go value is %v", where, name, apiTypes[name], typ)
		}
		if doc.Components.Schemas[name] == nil {
			t.Errorf("%s: dangling $ref %s", where, s.Ref)
		}
		return
	}
	want := ""
	switch typ.Kind() {
	case reflect.String:
		want = "string"
	case reflect.Bool:
		want = "boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		want = "integer"
	case reflect.Float32, reflect.Float64:
		want = "number"
	case reflect.Slice, reflect.Array:
		want = "array"
	case reflect.Map, reflect.Struct:
		want = "object"
	}
	if typ == timeType {
		want = "string"
		if s.Format != "date-time" {
			t.Errorf("%s: a time, documented with format %q, want date-time", where, s.Format)
		}
	}
	if s.Type != want {
		t.Errorf("%s: documented type %q, Go %v encodes as %q", where, s.Type, typ, want)
		return
	}
	switch {
	case want == "array":
		if s.Items == nil {
			t.Errorf("%s: array without items", where)
			return
		}
		checkSchema(t, doc, where+"[]", s.Items, typ.Elem())
	case typ.Kind() == reflect.Map:
		var ap schema
		if err := json.Unmarshal(s.AdditionalProperties, &ap); err != nil {
			t.Errorf("%s: a map: additionalProperties must be a schema (%v)", where, err)
			return
		}
		checkSchema(t, doc, where+"{}", &ap, typ.Elem())
	case typ.Kind() == reflect.Struct && typ != timeType:
		if s.Properties == nil && string(s.AdditionalProperties) == "true" {
			return // documented as a free-form object (linker.LinkMap)
		}
		if string(s.AdditionalProperties) != "false" {
			t.Errorf("%s: additionalProperties %s, want false (the Go type fixes the fields)", where, s.AdditionalProperties)
		}
		fields := map[string]reflect.Type{}
		var required []string
		for i := range typ.NumField() {
			f := typ.Field(i)
			tag := f.Tag.Get("json")
			if !f.IsExported() || tag == "-" {
				continue
			}
			name, opts, _ := strings.Cut(tag, ",")
			if name == "" {
				name = f.Name
			}
			fields[name] = f.Type
			if !strings.Contains(opts, "omitempty") && !strings.Contains(opts, "omitzero") {
				required = append(required, name)
			}
		}
		for name, ft := range fields {
			ps := s.Properties[name]
			if ps == nil {
				t.Errorf("%s: field %q (%v) not documented", where, name, ft)
				continue
			}
			checkSchema(t, doc, where+"."+name, ps, ft)
		}
		for name := range s.Properties {
			if _, ok := fields[name]; !ok {
				t.Errorf("%s: documents %q, which %v does not have", where, name, typ)
			}
		}
		got := slices.Clone(s.Required)
		sort.Strings(got)
		sort.Strings(required)
		if !slices.Equal(got, required) {
			t.Errorf("%s: required %q, always present in %v: %q", where, got, typ, required)
		}
	}
}

// validate checks a decoded JSON value against a schema of the document:
// types, required properties, no undocumented ones, enums.
func (doc *openAPI) validate(where string, v any, s *schema) error {
	if s.Ref != "" {
		return doc.validate(where, v, doc.Components.Schemas[strings.TrimPrefix(s.Ref, "#/components/schemas/")])
	}
	if v == nil {
		// encoding/json writes a nil slice or map as null.
		if s.Type == "array" || s.Type == "object" {
			return nil
		}
		return fmt.Errorf("%s: null, want %s", where, s.Type)
	}
	switch s.Type {
	case "string":
		str, ok := v.(string)
		if !ok {
			return fmt.Errorf("%s: %T, want string", where, v)
		}
		if len(s.Enum) > 0 && !slices.Contains(s.Enum, str) {
			return fmt.Errorf("%s: %q not one of %q", where, str, s.Enum)
		}
	case "integer", "number":
		f, ok := v.(float64)
		if !ok {
			return fmt.Errorf("%s: %T, want %s", where, v, s.Type)
		}
		if s.Type == "integer" && f != float64(int64(f)) {
			return fmt.Errorf("%s: %v, want an integer", where, f)
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			return fmt.Errorf("%s: %T, want boolean", where, v)
		}
	case "array":
		a, ok := v.([]any)
		if !ok {
			return fmt.Errorf("%s: %T, want array", where, v)
		}
		for i, e := range a {
			if err := doc.validate(fmt.Sprintf("%s[%d]", where, i), e, s.Items); err != nil {
				return err
			}
		}
	case "object":
		m, ok := v.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: %T, want object", where, v)
		}
		for _, r := range s.Required {
			if _, ok := m[r]; !ok {
				return fmt.Errorf("%s: required %q missing", where, r)
			}
		}
		for k, e := range m {
			ps := s.Properties[k]
			if ps == nil {
				if string(s.AdditionalProperties) == "false" {
					return fmt.Errorf("%s: %q is not documented", where, k)
				}
				continue
			}
			if err := doc.validate(where+"."+k, e, ps); err != nil {
				return err
			}
		}
	}
	return nil
}

// TestOpenAPIValidate: the validator the guest test uses catches what it
// must.
func TestOpenAPIValidate(t *testing.T) {
	doc := loadOpenAPI(t)
	ref := &schema{Ref: "#/components/schemas/Task"}
	good := []any{map[string]any{"pid": 1.0, "ppid": 0.0, "state": "S", "comm": "init", "task": "0xffff", "stack_pointer": "0xffff"}}
	if err := doc.validate("ps", good, &schema{Type: "array", Items: ref}); err != nil {
		t.Error(err)
	}
	for _, bad := range []map[string]any{
		{"pid": 1.5, "ppid": 0.0, "state": "S", "comm": "init", "task": "0x1", "stack_pointer": "0x1"},
		{"pid": 1.0, "ppid": 0.0, "state": "S", "comm": "init", "task": "0x1"},
		{"pid": 1.0, "ppid": 0.0, "state": "S", "comm": "init", "task": "0x1", "stack_pointer": "0x1", "extra": true},
		{"pid": "1", "ppid": 0.0, "state": "S", "comm": "init", "task": "0x1", "stack_pointer": "0x1"},
	} {
		if err := doc.validate("task", bad, ref); err == nil {
			t.Errorf("%v: valid, want an error", bad)
		}
	}
}
