-- busted output handler: gtest-style lines while running, then one closing
-- line "N passed, N failed" (errors count as failed), which CI reads.
return function(options)
  local busted = require 'busted'
  local inner = require 'busted.outputHandlers.gtest'(options)
  busted.subscribe({ 'suite', 'end' }, function()
    local failed = #inner.failures + #inner.errors
    io.write(string.format('%d passed, %d failed', #inner.successes, failed))
    if #inner.pendings > 0 then io.write(string.format(', %d skipped', #inner.pendings)) end
    io.write('\n')
    io.flush()
    return nil, true
  end, { priority = 1 })
  return inner
end
