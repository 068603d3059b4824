// Package docs holds the documents the binaries carry: OpenAPI is
// hvpatchd's API description (docs/openapi.json), served at /openapi.json.
package docs

import _ "embed"

// OpenAPI is docs/openapi.json, the OpenAPI 3 description of hvpatchd's
// HTTP API. daemon's tests check it against the routes the daemon serves
// and the Go types it answers with.
//
//go:embed openapi.json
var OpenAPI []byte
