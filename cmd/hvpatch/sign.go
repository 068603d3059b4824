package main

import (
	"crypto/ed25519"
	"fmt"
	"io"
	"os"

	"github.com/hvpatch/hvpatch/patchsign"
	"github.com/spf13/cobra"
)

func init() {
	addCommand(newKeygenCmd)
	addCommand(newSignCmd)
}

type keygenResult struct {
	KeyID   string `json:"key_id"`
	Public  string `json:"public"`
	Private string `json:"private"`
}

func newKeygenCmd(a *app) *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "keygen NAME",
		Short: "Make an ed25519 key pair for signing patches (NAME.key, NAME.pub)",
		Long: "Writes NAME.key (private, mode 0600) and NAME.pub in --dir. Put NAME.pub in one of hvpatchd's\n" +
			"signing.trusted_keys and keep NAME.key off the hosts.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			pub, priv, err := patchsign.GenerateKey(dir, args[0])
			if err != nil {
				return err
			}
			pk, err := patchsign.LoadPublicKey(pub)
			if err != nil {
				return err
			}
			res := keygenResult{KeyID: patchsign.KeyID(pk), Public: pub, Private: priv}
			return a.out.Emit(res, func(w io.Writer) error {
				_, err := fmt.Fprintf(w, "key %s: public %s, private %s\n", res.KeyID, res.Public, res.Private)
				return err
			})
		},
	}
	cmd.Flags().StringVar(&dir, "dir", ".", "directory for the key files")
	return cmd
}

type signResult struct {
	File      string `json:"file"`
	Signature string `json:"signature"`
	KeyID     string `json:"key_id"`
}

func newSignCmd(a *app) *cobra.Command {
	var key string
	cmd := &cobra.Command{
		Use:   "sign --key NAME.key FILE...",
		Short: "Sign patch files (writes FILE.sig next to each)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if key == "" {
				return fmt.Errorf("--key NAME.key is required")
			}
			priv, err := patchsign.LoadPrivateKey(key)
			if err != nil {
				return err
			}
			var out []signResult
			for _, f := range args {
				if _, err := os.Stat(f); err != nil {
					return err
				}
				sig, err := patchsign.SignFile(priv, f)
				if err != nil {
					return err
				}
				out = append(out, signResult{File: f, Signature: sig, KeyID: patchsign.KeyID(priv.Public().(ed25519.PublicKey))})
			}
			return a.out.Emit(out, func(w io.Writer) error {
				for _, r := range out {
					fmt.Fprintf(w, "signed %s with key %s: %s\n", r.File, r.KeyID, r.Signature)
				}
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&key, "key", "", "private key file from hvpatch keygen")
	return cmd
}
