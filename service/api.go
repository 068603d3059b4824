package service

// APIVersion prefixes every path of hvpatchd's API.
const APIVersion = "/v1"

// ApplyRequest is the body of POST /v1/domains/{domain}/apply.
type ApplyRequest struct {
	// Patch is the patch file's contents, Signature its .sig file's (empty
	// when unsigned). File names the patch in messages.
	Patch     string `json:"patch"`
	Signature string `json:"signature,omitempty"`
	File      string `json:"file,omitempty"`
	// Objects carries the objects the patch's replace edits link: the
	// object path as the edits write it (relative to the patch file) ->
	// the file's bytes in standard base64. hvpatchd reads no path of a
	// request: a replace edit whose object is not here is refused, and
	// each object must match the patch file's objects: SHA-256 pin.
	Objects    map[string]string `json:"objects,omitempty"`
	DryRun     bool              `json:"dry_run,omitempty"`
	RIPChecked bool              `json:"rip_checked,omitempty"`
}

// RevertRequest is the body of POST /v1/domains/{domain}/revert.
type RevertRequest struct {
	ID string `json:"id"`
}

// ErrorBody is what every failed API request answers.
type ErrorBody struct {
	Error string `json:"error"`
}
