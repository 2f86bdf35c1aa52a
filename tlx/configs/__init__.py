"""The run configs tlx's own commands build on (`tlx.advise`'s fine-tuning config), inside the
package so that an installed tlx has them; configs/ at the top of the repository names them."""
