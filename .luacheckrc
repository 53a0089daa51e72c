-- luacheck configuration (make lint)
std = "lua54"
max_line_length = 110
files["spec/"] = { std = "+busted" }
files["bench/"] = { ignore = { "212" } }
ignore = {
  "212/self",   -- unused self in methods
}
