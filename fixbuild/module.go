package fixbuild

import (
	"errors"
	"fmt"
	"sort"

	"github.com/hvpatch/hvpatch/kobj"
	"github.com/hvpatch/hvpatch/objdiff"
	"github.com/hvpatch/hvpatch/symbols"
)

// moduleView is a guest seen from one loaded module's code: names the
// module defines are its own (statics included, numbered within the
// module), every other name is the kernel image's. It is how the linker
// resolves a module patch's names at apply time.
type moduleView struct {
	Guest
	module string
	own    *symbols.Table
}

func (v moduleView) Lookup(name string) []symbols.Symbol {
	if s := v.own.Lookup(name); len(s) > 0 {
		return s
	}
	return v.Guest.Lookup(name)
}

// verifyWhere finds where an object's code lives in the guest: in the
// kernel image, or, when the image has none of its functions, in the loaded
// module that has the most of them. It returns the view the rest of the
// build resolves names in and the module's name ("" for the image).
func verifyWhere(obj *kobj.File, g Guest) (objdiff.Guest, string, *objdiff.Match, error) {
	m, err := objdiff.Verify(obj, g)
	if err == nil || !errors.Is(err, objdiff.ErrNotInGuest) || g.ModuleSymbols == nil {
		return g, "", m, err
	}
	all, merr := g.ModuleSymbols()
	if merr != nil {
		return nil, "", nil, fmt.Errorf("%w; reading the loaded modules' symbols: %v", err, merr)
	}
	byMod := map[string][]symbols.Symbol{}
	for _, s := range all {
		byMod[s.Module] = append(byMod[s.Module], s)
	}
	hits := map[string]int{}
	for _, fn := range obj.Functions() {
		for mod, syms := range byMod {
			for _, s := range syms {
				if s.Name == fn.Name && symbols.IsText(s.Type) {
					hits[mod]++
					break
				}
			}
		}
	}
	if len(hits) == 0 {
		return nil, "", nil, fmt.Errorf("%w, nor in any loaded module's (is the module loaded?)", err)
	}
	mods := make([]string, 0, len(hits))
	for mod := range hits {
		mods = append(mods, mod)
	}
	sort.Slice(mods, func(i, j int) bool {
		return hits[mods[i]] > hits[mods[j]] || (hits[mods[i]] == hits[mods[j]] && mods[i] < mods[j])
	})
	v := moduleView{Guest: g, module: mods[0], own: symbols.NewTable(byMod[mods[0]])}
	m, err = objdiff.Verify(obj, v)
	if err != nil {
		return nil, "", nil, fmt.Errorf("module %s: %w", v.module, err)
	}
	return v, v.module, m, nil
}
