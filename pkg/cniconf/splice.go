package cniconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// span is the byte range [start, end) of a JSON value in a document.
type span struct{ start, end int }

// object is a scanned top-level JSON object: the raw span of each member's value
// (the last one wins for a duplicated key, as with encoding/json and libcni).
type object struct {
	members map[string]span
}

// list is a scanned conflist: the spans of the "plugins" array and of its elements.
type list struct {
	open, close int // offsets of '[' and ']'
	elems       []span
	types       []string
}

func syntaxError(raw []byte) error {
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return fmt.Errorf("not valid JSON: %w", err)
	}
	return errors.New("not valid JSON")
}

func skip(raw []byte, i int, chars string) int {
	for i < len(raw) && bytes.IndexByte([]byte(chars), raw[i]) >= 0 {
		i++
	}
	return i
}

const ws = " \t\r\n"

// parseObject scans raw, which must be one JSON object.
func parseObject(raw []byte) (*object, error) {
	if !json.Valid(raw) {
		return nil, syntaxError(raw)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, errors.New("the top level is not a JSON object")
	}
	o := &object{members: map[string]span{}}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := tok.(string)
		after := int(dec.InputOffset())
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		s := span{skip(raw, after, ws+":"), int(dec.InputOffset())}
		if !bytes.Equal(raw[s.start:s.end], v) {
			return nil, fmt.Errorf("internal error: cannot locate the value of %q", key)
		}
		o.members[key] = s
	}
	return o, nil
}

// parseList scans a conflist and checks the shape libcni needs: an object with a non-empty
// "plugins" array of objects that each have a "type" string.
func parseList(raw []byte) (*list, error) {
	o, err := parseObject(raw)
	if err != nil {
		return nil, err
	}
	ps, ok := o.members["plugins"]
	if !ok {
		return nil, errors.New(`no "plugins" array: not a conflist`)
	}
	if raw[ps.start] != '[' {
		return nil, errors.New(`"plugins" is not an array`)
	}
	l := &list{open: ps.start, close: ps.end - 1}
	sub := raw[ps.start:ps.end]
	dec := json.NewDecoder(bytes.NewReader(sub))
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	for dec.More() {
		before := int(dec.InputOffset())
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		s := span{ps.start + skip(sub, before, ws+","), ps.start + int(dec.InputOffset())}
		if !bytes.Equal(raw[s.start:s.end], v) {
			return nil, errors.New("internal error: cannot locate a plugin entry")
		}
		var p struct {
			Type string `json:"type"`
		}
		if raw[s.start] != '{' || json.Unmarshal(v, &p) != nil || p.Type == "" {
			return nil, fmt.Errorf(`plugins[%d] is not an object with a "type" string`, len(l.elems))
		}
		l.elems = append(l.elems, s)
		l.types = append(l.types, p.Type)
	}
	if len(l.elems) == 0 {
		return nil, errors.New(`"plugins" is empty`)
	}
	return l, nil
}

func (l *list) find() int {
	for i, t := range l.types {
		if t == PluginType {
			return i
		}
	}
	return -1
}

// indentOf returns the whitespace between the line start and offset i, or "" if something
// else precedes i on its line.
func indentOf(raw []byte, i int) string {
	j := i
	for j > 0 && (raw[j-1] == ' ' || raw[j-1] == '\t') {
		j--
	}
	if j == 0 || raw[j-1] == '\n' {
		return string(raw[j:i])
	}
	return ""
}

// render formats our compact entry to sit at offset at in raw: indented like its
// neighbours if the list is one element per line, compact otherwise.
func render(raw []byte, at int, multiline bool, compact []byte) []byte {
	if !multiline {
		return compact
	}
	prefix := indentOf(raw, at)
	unit := "  "
	if bytes.Contains(raw, []byte("\n\t")) {
		unit = "\t"
	}
	var b bytes.Buffer
	if err := json.Indent(&b, compact, prefix, unit); err != nil {
		return compact
	}
	return b.Bytes()
}

func splice(raw []byte, start, end int, insert []byte) []byte {
	out := make([]byte, 0, len(raw)-(end-start)+len(insert))
	out = append(out, raw[:start]...)
	out = append(out, insert...)
	return append(out, raw[end:]...)
}

// addToList returns raw with our entry (compact JSON) appended as the last plugin, or with
// our existing entry replaced if it differs; Unchanged (and raw) if it is already there.
func addToList(raw, want []byte) ([]byte, Action, error) {
	l, err := parseList(raw)
	if err != nil {
		return nil, "", err
	}
	n := len(l.elems)
	if i := l.find(); i >= 0 {
		s := l.elems[i]
		if sameJSON(raw[s.start:s.end], want) {
			return raw, Unchanged, nil
		}
		multiline := bytes.ContainsRune(raw[s.start:s.end], '\n')
		return splice(raw, s.start, s.end, render(raw, s.start, multiline, want)), Updated, nil
	}
	last := l.elems[n-1]
	var sep []byte
	if n >= 2 {
		sep = raw[l.elems[n-2].end:last.start]
	} else {
		sep = append([]byte(","), raw[l.open+1:last.start]...)
	}
	multiline := bytes.ContainsRune(sep, '\n')
	entry := render(raw, last.start, multiline, want)
	insert := append(append([]byte{}, sep...), entry...)
	return splice(raw, last.end, last.end, insert), Appended, nil
}

// removeFromList returns raw without our entry (and the separator before it).
func removeFromList(raw []byte) ([]byte, bool, error) {
	l, err := parseList(raw)
	if err != nil {
		return nil, false, err
	}
	i := l.find()
	if i < 0 {
		return raw, false, nil
	}
	if len(l.elems) == 1 {
		return nil, false, errors.New("meshless-cni is the only plugin; refusing to leave an empty plugin list")
	}
	if i > 0 {
		return splice(raw, l.elems[i-1].end, l.elems[i].end, nil), true, nil
	}
	return splice(raw, l.elems[0].start, l.elems[1].start, nil), true, nil
}
