-- luacheck configuration (make lint)
std = "lua54"
max_line_length = 110
files["spec/"] = { std = "+busted", max_line_length = 130 }
files["bench/"] = { ignore = { "212" } }
ignore = {
  "212/self",   -- unused self in methods
  "581",        -- not (x >= y): meant, it is also true for NaN
}
